"""Self-contained HTML pages of ``itae check`` and ``itae compare``, drawn with Jinja2 (autoescaped).

The pages only draw what ``itae.collection`` computed: tables of rows and thumbnails as data URIs. No
scripts, no network: every image is embedded.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from itae._io import atomic_write_text

Thumbnails = Callable[[str], Any] | None  # id -> PIL image, (H, W, 3) array or path; None when unreadable

_CSS = """
:root{--fg:#1f2328;--muted:#656d76;--line:#d8dee4;--bg:#fff;--soft:#f6f8fa;--accent:#2563eb;--up:#1a7f37;
--down:#cf222e}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:var(--bg)}
header{padding:22px 32px 14px;border-bottom:1px solid var(--line);background:var(--soft)}
header h1{margin:0 0 4px;font-size:22px;font-weight:600;overflow-wrap:anywhere}
header .summary{color:var(--muted);margin:0}
nav{margin-top:10px}nav a{color:var(--accent);text-decoration:none;margin-right:16px;font-size:13px}
main{max-width:1280px;margin:0 auto;padding:8px 32px 48px}
section{margin-top:30px}
h2{font-size:17px;font-weight:600;margin:0 0 10px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:14px;font-weight:600;margin:16px 0 6px}
.note{color:var(--muted);font-size:13px;margin:4px 0 10px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
table.grid th,table.grid td{padding:4px 12px;border-bottom:1px solid var(--line);text-align:right}
table.grid th:first-child,table.grid td:first-child{text-align:left}
table.grid thead th{border-bottom:2px solid var(--fg);font-weight:600}
.up{color:var(--up)}.down{color:var(--down)}
.scroll{overflow-x:auto}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}
.group{margin-bottom:14px}
figure{margin:0;width:var(--thumb)}
figure img,.noimg{display:block;width:var(--thumb);height:var(--thumb);object-fit:cover;border-radius:3px;
background:var(--soft)}
.noimg{display:flex;align-items:center;justify-content:center;color:var(--muted);font-size:11px}
figcaption{font-size:10px;color:var(--muted);overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
figcaption b{color:var(--fg);font-weight:600}
.sbs{display:grid;grid-template-columns:1fr 1fr;gap:24px}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:12px 14px;overflow:auto;
font:12px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
footer{color:var(--muted);font-size:12px;margin-top:40px}
"""

_BASE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><style>{{ css | safe }}</style></head>
<body style="--thumb:{{ thumb }}px">
<header><h1>{{ title }}</h1><p class="summary">{{ summary | join(" \u00b7 ") }}</p>
<nav>{% for sid, name in nav %}<a href="#{{ sid }}">{{ name }}</a>{% endfor %}</nav></header>
<main>{% block body %}{% endblock %}
<footer>Self-contained page: no scripts, no network; images are embedded. itae {{ version }}, {{ generated }}.</footer>
</main></body></html>
"""

_MACROS = """
{% macro thumb(item) -%}
<figure title="{{ item.title }}">{% if item.uri %}<img src="{{ item.uri }}" alt="{{ item.path }}" loading="lazy">
{%- else %}<div class="noimg">no image</div>{% endif %}
{%- for line in item.lines %}<figcaption>{{ line }}</figcaption>{% endfor %}</figure>
{%- endmacro %}
{% macro table(header, rows, numeric_from=1) -%}
<div class="scroll"><table class="grid"><thead><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table></div>
{%- endmacro %}
"""

_CHECK = """{% extends "base" %}{% import "macros" as m %}{% block body %}
<section id="summary"><h2>Summary</h2>
{{ m.table(["", "value"], facts) }}
<p class="note">{{ method_note }}</p></section>

<section id="duplicates"><h2>Near-duplicate groups ({{ n_groups }})</h2>
{% if groups %}<p class="note">Images within cosine distance {{ dup_threshold }} of a neighbour, grouped by
connected components{% if n_groups > groups|length %}; the {{ groups|length }} largest groups shown, all in
duplicates.csv{% endif %}.</p>
{% for g in groups %}<div class="group"><h3>group {{ g.group }} &middot; {{ g.size }} images</h3>
<div class="thumbs">{% for item in g["items"] %}{{ m.thumb(item) }}{% endfor %}</div></div>{% endfor %}
{% else %}<p class="note">No near-duplicates at cosine distance {{ dup_threshold }}.</p>{% endif %}</section>

<section id="outliers"><h2>Outliers ({{ n_outliers }})</h2>
{% if outliers %}<p class="note">Largest mean cosine distance to the {{ neighbours }} nearest neighbours, robust
z-score at least {{ outlier_z }}{% if n_outliers > outliers|length %}; the first {{ outliers|length }} shown,
all in outliers.csv{% endif %}.</p>
<div class="thumbs">{% for item in outliers %}{{ m.thumb(item) }}{% endfor %}</div>
{% else %}<p class="note">No image has a robust z-score of {{ outlier_z }} or more.</p>{% endif %}</section>

<section id="mislabels"><h2>Likely mislabels{% if has_labels %} ({{ n_suspects }}){% endif %}</h2>
{% if not has_labels %}<p class="note">No labels: the store has none and no assignments with labels were
given.</p>
{% elif suspects %}<p class="note">Label, then the label its neighbours{% if has_clusters %} or its cluster{% endif %} suggest;
ranked by disagreement{% if n_suspects > suspects|length %}; the first {{ suspects|length }} shown, all
in mislabels.csv{% endif %}.</p>
<div class="thumbs">{% for item in suspects %}{{ m.thumb(item) }}{% endfor %}</div>
{% else %}<p class="note">Every image's label agrees with most of its neighbours{% if has_clusters %} and its
cluster{% endif %}.</p>{% endif %}</section>
{% endblock %}
"""

_COMPARE = """{% extends "base" %}{% import "macros" as m %}{% block body %}
<section id="runs"><h2>Runs</h2>
<div class="sbs">{% for run in runs %}<div><h3>{{ run.name }}: {{ run.title }}</h3>
{{ m.table(["", "value"], run.facts) }}</div>{% endfor %}</div>
{% for line in notes %}<p class="note">{{ line }}</p>{% endfor %}</section>

<section id="metrics"><h2>Metrics</h2>
{% if metrics %}{{ m.table(["", names[0], names[1], "B \u2212 A"], metrics) }}
<p class="note">Computed here from both runs' assignments on the {{ n_common }} images they share.</p>
{% else %}<p class="note">No labels: no scores. The runs agree on {{ agreement }} of the images (clusters
matched one to one).</p>{% endif %}
{{ m.table(["agreement between the runs", "value"], agreement_rows) }}</section>

<section id="classes"><h2>Change per class</h2>
{% if classes %}<p class="note">Accuracy per class: the share of the class's images in the cluster matched to
it (Hungarian matching of each run's clusters to the labels).</p>
{{ m.table(["class", "images", names[0], names[1], "B \u2212 A"], classes) }}
{% else %}<p class="note">No labels: no per-class change.</p>{% endif %}</section>

<section id="changed"><h2>Images whose cluster changed ({{ n_changed }})</h2>
<p class="note">Clusters of B are matched to clusters of A one to one (Hungarian matching on the runs'
contingency table); an image changed when its B cluster is not the match of its A cluster.
{% if n_changed > changed|length %}The first {{ changed|length }} shown, all in changed.csv.{% endif %}</p>
<div class="thumbs">{% for item in changed %}{{ m.thumb(item) }}{% endfor %}</div></section>
{% endblock %}
"""

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader({"base": _BASE, "macros": _MACROS, "check": _CHECK, "compare": _COMPARE}),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def thumbnail_uri(image: Any, size: int) -> str | None:
    """A JPEG data URI of ``image`` (PIL image, (H, W, 3) array or path) fitted in size x size, or None."""
    from PIL import Image

    from itae.report.figures import image_array

    if image is None:
        return None
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            im = im.convert("RGB")
    elif isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        im = Image.fromarray(image_array(image))
    im.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumb_item(path: str, lines: Sequence[str], thumbnails: Thumbnails, size: int) -> dict[str, Any]:
    """What the ``thumb`` macro draws: the image (or a placeholder), its caption lines, a hover title."""
    uri = None
    if thumbnails is not None:
        try:
            uri = thumbnail_uri(thumbnails(path), size)
        except (OSError, ValueError):
            uri = None
    return {"path": path, "uri": uri, "lines": list(lines), "title": "\n".join([path, *lines[1:]])}


def _render(template: str, path: str | Path, **context: Any) -> Path:
    from itae import __version__

    context.setdefault("thumb", 96)
    page = _ENV.get_template(template).render(
        css=_CSS, version=__version__,
        generated=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(), **context,
    )
    path = Path(path)
    atomic_write_text(path, page)
    return path


def write_check_page(path: str | Path, context: Mapping[str, Any]) -> Path:
    """``check.html``; ``context`` as built by ``itae.collection.check``."""
    nav = [("summary", "summary"), ("duplicates", "duplicates"), ("outliers", "outliers"), ("mislabels", "mislabels")]
    return _render("check", path, nav=nav, **context)


def write_compare_page(path: str | Path, context: Mapping[str, Any]) -> Path:
    """The comparison page; ``context`` as built by ``itae.collection.compare``."""
    nav = [("runs", "runs"), ("metrics", "metrics"), ("classes", "per class"), ("changed", "changed images")]
    return _render("compare", path, nav=nav, **context)
