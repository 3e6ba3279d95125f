"""The README's Python API example runs as written, with a tiny local model in place of DINOv2."""

from __future__ import annotations

import re
from pathlib import Path

from .helpers import colour_classes
from .helpers.tiny import save_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no python code block"
    return match.group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    code = _api_example()
    assert code.count('"facebook/dinov2-base"') == 4  # the only things this test changes
    model = save_tiny("hf", tmp_path / "tiny", depth=3)  # not 12 blocks: state.last must not assume a depth
    colour_classes(tmp_path / "photos", 12, colours=[(220, 40, 40), (40, 40, 220)], names=("cats", "dogs"),
                   size=(60, 70), noise=30, first=1, name="{i}.jpg")  # 24 images: enough for k=20
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace('"facebook/dinov2-base"', repr(str(model))), str(README), "exec"), namespace)
    x, mask = namespace["x"], namespace["mask"]
    assert tuple(x.shape[:2]) == (2, 3) and mask.shape[0] == 2
    assert namespace["result"].labels.shape == (24,) and 0.0 <= namespace["scores"]["acc"] <= 1.0
    assert (tmp_path / "out" / "run.json").is_file() and (tmp_path / "store" / "embeddings.npy").is_file()
    assert namespace["new"]["n_images"] == 12 and (tmp_path / "out_new" / "assignments.csv").is_file()
    assert isinstance(namespace["checks"].duplicates, list) and namespace["checks"].mislabels is not None
    assert namespace["summary"]["n_images"] == 24 and (tmp_path / "compare" / "compare.html").is_file()
