"""Extraction end to end on a tiny random model: parity with direct forwards, every input format, ITAE on,
resume after kill -9 identical to a clean run, streaming, and bad input refused cleanly."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import itae
from itae import ITAEConfig
from itae.data.decode import build_transform, load_rgb
from itae.data.store import StoreError
from itae.models import adapt

from .helpers.tiny import tiny_model

RES = 56  # crop fed to the tiny model (4 x 4 patches of 14)
COMMON = dict(batch_size=4, num_workers=0, resolution=RES, progress=False, device="cpu")

# Builds the model used by these tests; also run in subprocesses, so it is source text.
MODEL_CODE = textwrap.dedent(
    """
    import torch
    from tests.helpers.tiny import tiny_model
    from itae.models.planted import plant_artifacts

    def build_model(planted=True):
        model = tiny_model("hf", seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lambda1"):
                    p.fill_(1.0)  # layer scale 1, so the random blocks change the tokens
        if planted:
            plant_artifacts(model, [2, 9])  # two attention sinks, so ITAE has something to do
        return model.eval()
    """
)
_ns: dict = {}
exec(MODEL_CODE, _ns)
build_model = _ns["build_model"]


def _image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _make_folder(root: Path, per_class: int = 5, corrupt: int = 1) -> Path:
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _image(100 * c + i).save(root / name / f"{i:03d}.png")
    for j in range(corrupt):
        (root / "cat" / f"zz-broken-{j}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _direct(backbone, paths: list[Path], cfg: ITAEConfig | None = None) -> torch.Tensor:
    """Reference: decode, preprocess and forward one image at a time, without the extraction code."""
    t = build_transform(backbone.preprocess.with_resolution(RES))
    x = torch.stack([t(load_rgb(p)) for p in paths])
    with torch.no_grad():
        if cfg is None:
            return torch.cat([backbone.forward_features(x[i : i + 1]).cls for i in range(len(x))])
        with itae.attenuate(backbone, cfg):
            return torch.cat([backbone.forward_features(x[i : i + 1]).cls for i in range(len(x))])


def test_baseline_store_matches_direct_forwards(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    bb = adapt(build_model())
    store = itae.embed(root, bb, out=tmp_path / "out", itae=None, labels="from-folders", chunk_size=3, **COMMON)
    assert store.is_complete and len(store) == 10 and store.dim == 32
    assert store.ids == [f"cat/{i:03d}.png" for i in range(5)] + [f"dog/{i:03d}.png" for i in range(5)]
    assert store.labels == ["cat"] * 5 + ["dog"] * 5
    assert store.indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert store.errors == [(5, "cat/zz-broken-0.jpg", "not an image (unrecognised format)")]
    ref = _direct(bb, [root / i for i in store.ids])
    torch.testing.assert_close(torch.from_numpy(store.embeddings(mmap=False)), ref, rtol=1e-4, atol=1e-5)
    m = store.manifest
    assert m["itae"] is None and m["feature"] == "cls" and m["precision"] == "fp32"
    assert m["preprocess"]["image_size"] == RES and m["source"]["num_records"] == 11
    assert {"itae", "torch", "transformers", "timm", "numpy"} <= set(m["versions"])
    assert sorted(os.listdir(tmp_path / "out")) == ["embeddings.npy", "errors.csv", "manifest.json", "records.csv"]


def test_features_and_normalisation(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=2, corrupt=0)
    bb = adapt(build_model())
    cls = np.asarray(itae.embed(root, bb, out=tmp_path / "cls", itae=None, **COMMON).embeddings())
    mean = itae.embed(root, bb, out=tmp_path / "mean", itae=None, feature="mean", **COMMON).embeddings()
    both = itae.embed(root, bb, out=tmp_path / "both", itae=None, feature="cls+mean", **COMMON).embeddings()
    unit = itae.embed(root, bb, out=tmp_path / "unit", itae=None, feature="cls+mean", normalize=True,
                      **COMMON).embeddings()
    assert cls.shape == mean.shape == (4, 32) and both.shape == unit.shape == (4, 64)
    np.testing.assert_allclose(both[:, :32], cls, atol=1e-6)
    np.testing.assert_allclose(both[:, 32:], mean, atol=1e-6)
    assert not np.allclose(cls, mean)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, both / np.linalg.norm(both, axis=1, keepdims=True), atol=1e-6)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_every_input_format(tmp_path):
    """The same four images as a folder, a CSV list, WebDataset shards and a HF data set embed the same."""
    images = [_image(i) for i in range(4)]
    labels = ["a", "b", "a", "b"]
    folder = tmp_path / "folder"
    for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
        (folder / lab).mkdir(parents=True, exist_ok=True)
        im.save(folder / lab / f"{i}.png")
    order = sorted(range(4), key=lambda i: f"{labels[i]}/{i}.png")  # the folder's sorted order
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"folder/{labels[i]}/{i}.png,{labels[i]}\n"
                                                                for i in order))
    shards = tmp_path / "shards"
    shards.mkdir()
    for s, part in enumerate((order[:2], order[2:])):
        with tarfile.open(shards / f"part-{s}.tar", "w") as tar:
            for i in part:
                for ext, data in (("png", _png_bytes(images[i])), ("cls", labels[i].encode())):
                    info = tarfile.TarInfo(f"{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict(
        {"img": [{"bytes": _png_bytes(images[i]), "path": None} for i in order], "y": [labels[i] for i in order]},
        features=datasets.Features({"img": datasets.Image(), "y": datasets.Value("string")}),
    )
    hf.save_to_disk(str(tmp_path / "hf"))

    bb = adapt(build_model())
    runs = {
        "folder": dict(source=folder, labels="from-folders"),
        "csv": dict(source=tmp_path / "list.csv", labels="column"),
        "webdataset": dict(source=str(shards / "part-{0..1}.tar"), labels="column"),
        "hf": dict(source=tmp_path / "hf", labels="column", image_column="img", label_column="y"),
    }
    results = {}
    for name, kw in runs.items():
        store = itae.embed(kw.pop("source"), bb, out=tmp_path / f"out-{name}", itae=None, **kw, **COMMON)
        assert store.manifest["source"]["kind"] in ("folder", "list", "webdataset", "hf")
        assert store.labels == [labels[i] for i in order], name
        results[name] = np.asarray(store.embeddings())
    for name, emb in results.items():
        np.testing.assert_allclose(emb, results["folder"], rtol=0, atol=1e-6, err_msg=name)


def test_itae_on_by_default_calibrates_and_engineers(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=6, corrupt=1)
    bb = adapt(build_model())
    base = itae.embed(root, bb, out=tmp_path / "base", itae=None, **COMMON)
    store = itae.embed(root, bb, out=tmp_path / "itae", calibration_images=8, chunk_size=5, **COMMON)
    m = store.manifest
    assert m["itae_requested"]["threshold"] == "auto"
    cfg = store.itae_config
    assert cfg is not None and cfg.is_calibrated
    assert m["calibration"]["images"] == 8
    assert 0 < m["calibration"]["flagged_fraction"]["1"] < 0.5
    # The same thresholds from the engine directly, on the first 8 decodable images of whole extraction
    # batches spread evenly over the source: 13 records in chunks of 5 make the batches [0-3], [4], [5-8],
    # [9], [10-12]; the first and the last give 7 images, the next one in source order the 8th.
    from itae.data.dataset import CalibrationBatches
    from itae.data.sources import open_source

    ids = open_source(root).ids
    order = [i for b in CalibrationBatches(len(ids), 5, 4, 8) for i in b]
    assert order[:8] == [0, 1, 2, 3, 10, 11, 12, 4]
    t = build_transform(bb.preprocess.with_resolution(RES))
    sample = []
    for i in order:
        try:
            sample.append(t(load_rgb(root / ids[i])))
        except Exception:
            continue
        if len(sample) == 8:
            break
    assert itae.calibrate(bb, torch.stack(sample), ITAEConfig()).config == cfg
    ref = _direct(bb, [root / i for i in store.ids], cfg)
    emb = torch.from_numpy(store.embeddings(mmap=False))
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(emb, torch.from_numpy(base.embeddings(mmap=False)), atol=1e-3)
    hooked = itae.embed(root, bb, out=tmp_path / "hooked", calibration_images=8, chunk_size=5, fast_cls=False,
                        **COMMON)
    assert hooked.itae_config == cfg
    torch.testing.assert_close(torch.from_numpy(hooked.embeddings(mmap=False)), emb, rtol=1e-4, atol=1e-5)
    # A complete store with the same settings is returned as it is; other settings are refused.
    before = (tmp_path / "itae" / "embeddings.npy").stat().st_mtime_ns
    assert itae.embed(root, bb, out=tmp_path / "itae", calibration_images=8, chunk_size=5, **COMMON).is_complete
    assert (tmp_path / "itae" / "embeddings.npy").stat().st_mtime_ns == before
    with pytest.raises(StoreError, match="other settings.*itae_requested"):
        itae.embed(root, bb, out=tmp_path / "itae", itae=None, calibration_images=8, chunk_size=5, **COMMON)
    with pytest.raises(StoreError, match="resume=True"):
        itae.embed(root, bb, out=tmp_path / "itae", resume=False, calibration_images=8, chunk_size=5, **COMMON)
    again = itae.embed(root, bb, out=tmp_path / "itae", itae=ITAEConfig(source="v", side="low", threshold=cfg.threshold), overwrite=True,
                       chunk_size=5, **COMMON)
    np.testing.assert_array_equal(np.asarray(again.embeddings()), emb.numpy())


def test_chunks_reach_disk_while_extracting(tmp_path):
    """Streaming: by the time a batch runs, every chunk before the previous batch's is already a file
    (one batch is in flight on the device while the host stores the one before; nothing accumulates)."""
    root = _make_folder(tmp_path / "imgs", per_class=8, corrupt=0)
    bb = adapt(build_model(planted=False))
    inner = bb.forward_features_fn
    seen: list[list[str]] = []

    def spy(x):
        seen.append(sorted(p.name for p in (tmp_path / "out").glob("chunk-*.npz")))
        return inner(x)

    bb.forward_features_fn = spy
    itae.embed(root, bb, out=tmp_path / "out", itae=None, chunk_size=4, fast_cls=False, **COMMON)
    # batch j (chunk j, batch = chunk = 4 images) runs when chunks 0..j-2 are on disk
    assert seen == [[f"chunk-{k:05d}.npz" for k in range(max(0, j - 1))] for j in range(4)]
    assert sorted(p.name for p in (tmp_path / "out").glob("chunk-*.npz")) == []  # consolidated at the end


def test_bf16_weights_are_real(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=2, corrupt=0)
    model = build_model(planted=False)
    ref = itae.embed(root, model, out=tmp_path / "fp32", itae=None, **COMMON).embeddings()
    store = itae.embed(root, model, out=tmp_path / "bf16", itae=None, precision="bf16", **COMMON)
    assert next(model.parameters()).dtype == torch.bfloat16  # the weights, not autocast
    emb = store.embeddings()
    assert emb.dtype == np.float32 and store.manifest["precision"] == "bf16"
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98 and not np.array_equal(emb, ref)


def test_bad_input_is_refused_cleanly(tmp_path):
    bb = adapt(build_model(planted=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        itae.embed(tmp_path / "empty", bb, out=tmp_path / "o1", **COMMON)
    assert not (tmp_path / "o1").exists()

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.jpg").write_bytes(b"")
    (corrupt / "b.png").write_text("text")
    for cfg, out in ((None, "o2"), (ITAEConfig(), "o3")):  # extraction path and calibration path
        with pytest.raises(ValueError, match="none of the 2 images .*could be decoded.*'a.jpg': empty file"):
            itae.embed(corrupt, bb, out=tmp_path / out, itae=cfg, **COMMON)
        assert os.listdir(tmp_path / out) == ["errors.csv"]
        assert (tmp_path / out / "errors.csv").read_text() == (
            "index,id,reason\n0,a.jpg,empty file (0 bytes)\n1,b.png,not an image (unrecognised format)\n"
        )

    good = _make_folder(tmp_path / "good", per_class=1, corrupt=0)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        itae.embed(good, bb, out=tmp_path / "a-file", **COMMON)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not empty and holds no itae store"):
        itae.embed(good, bb, out=tmp_path / "busy", itae=None, **COMMON)
    assert os.listdir(tmp_path / "busy") == ["thesis.tex"]
    for kw, match in ((dict(feature="max"), "feature"), (dict(precision="fp64"), "precision"),
                      (dict(batch_size=0), "batch_size"), (dict(chunk_size=-1), "chunk_size"),
                      (dict(num_workers=-1), "num_workers"), (dict(num_workers=1.5), "num_workers")):
        with pytest.raises(ValueError, match=match):
            itae.embed(good, bb, out=tmp_path / "o4", **{**COMMON, **kw})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            itae.embed(good, bb, out=tmp_path / "o4", **{**COMMON, "device": "cuda"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_low_precision_with_workers(tmp_path, precision):
    root = _make_folder(tmp_path / "imgs", per_class=6, corrupt=1)
    ref = itae.embed(root, build_model(), out=tmp_path / "cpu", itae=None, **COMMON).embeddings()
    model = build_model()
    store = itae.embed(root, model, out=tmp_path / "gpu", itae=None, **{**COMMON, "device": "cuda",
                       "precision": precision, "num_workers": 2})
    p = next(model.parameters())
    assert p.is_cuda and p.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    emb = store.embeddings()
    assert emb.dtype == np.float32 and len(store.errors) == 1
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_folder(tmp_path):
    good = _make_folder(tmp_path / "good", per_class=1, corrupt=0)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="cannot write in output folder"):
            itae.embed(good, build_model(planted=False), out=locked, **COMMON)
    finally:
        locked.chmod(0o700)


def test_nan_embedding_is_refused_and_named(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=4, corrupt=0)
    Image.new("RGB", (40, 40), (0, 0, 0)).save(root / "dog" / "001.png")  # record 5: a flat black image
    bb = adapt(build_model(planted=False))
    inner = bb.forward_features_fn

    def poisoned(x):
        out = inner(x)
        flat = x.flatten(2).std(dim=2).amax(dim=1) < 1e-6  # (B, 3, S*S) -> (B,): the flat image's rows
        out.cls[flat] = float("nan")
        return out

    bb.forward_features_fn = poisoned
    with pytest.raises(ValueError, match="non-finite.*'dog/001.png'"):
        itae.embed(root, bb, out=tmp_path / "out", itae=None, chunk_size=2, fast_cls=False, **COMMON)
    # Chunks before the bad image are committed; the bad image's chunk was never written.
    assert sorted(p.name for p in (tmp_path / "out").glob("chunk-*")) == ["chunk-00000.npz", "chunk-00001.npz"]
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]
    bb.forward_features_fn = inner
    store = itae.embed(root, bb, out=tmp_path / "out", itae=None, chunk_size=2, fast_cls=False, **COMMON)
    assert len(store) == 8


KILL_SCRIPT = MODEL_CODE + textwrap.dedent(
    """
    import sys, time
    import itae
    from itae.data.sources import open_source
    from itae.models import adapt

    torch.set_num_threads(1)

    def run(source, out, delay=0.0):
        src = open_source(source, labels="from-folders")
        if delay:
            inner = src.read

            def slow(index):
                time.sleep(delay)  # widen the window in which the test kills us
                return inner(index)

            src.read = slow
        return itae.embed(src, adapt(build_model()), out=out, batch_size=4, chunk_size=8, num_workers=0,
                          resolution=56, calibration_images=8, progress=False, device="cpu")

    if __name__ == "__main__":
        run(sys.argv[1], sys.argv[2], float(sys.argv[3]))
        print("finished")
    """
)


def test_resume_after_kill_9_is_identical_to_a_clean_run(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=30, corrupt=3)  # 63 records, 8 chunks of 8
    script = tmp_path / "extract_job.py"
    script.write_text(KILL_SCRIPT)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}  # tests.helpers too
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(killed), "0.04"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(list(killed.glob("chunk-*.npz"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the extraction subprocess never wrote two chunks"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.6))  # a random point after some chunks were written
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    assert len(list(killed.glob("chunk-*.npz"))) < 8

    resumed = subprocess.run([sys.executable, str(script), str(root), str(killed), "0"], env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    ns: dict = {"__name__": "kill_script"}
    exec(KILL_SCRIPT, ns)
    clean = ns["run"](str(root), str(tmp_path / "clean"))

    a, b = itae.data.EmbeddingStore(killed), clean
    assert b.manifest["itae"]["threshold"] != "auto"
    assert sorted(os.listdir(killed)) == sorted(os.listdir(tmp_path / "clean"))
    for name in ("manifest.json", "records.csv", "errors.csv", "embeddings.npy"):
        assert (killed / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    np.testing.assert_array_equal(np.asarray(a.embeddings()), np.asarray(b.embeddings()))
    assert a.ids == b.ids and a.labels == b.labels and a.errors == b.errors and len(a.errors) == 3


def _large_jpegs(root: Path, n: int = 4) -> Path:
    """Smooth photo-like JPEGs big enough (>= 2 x the resize side of RES) for reduced-scale decoding."""
    root.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8))
        coarse.resize((400, 320), Image.Resampling.BICUBIC).save(root / f"{i}.jpg", quality=92)
    return root


def test_fast_decode_is_recorded_close_to_full_decoding_and_never_mixed_on_resume(tmp_path):
    root = _large_jpegs(tmp_path / "imgs")
    bb = adapt(build_model())
    full = itae.embed(root, bb, out=tmp_path / "full", itae=None, **COMMON)
    fast = itae.embed(root, bb, out=tmp_path / "fast", itae=None, fast_decode=True, **COMMON)
    assert "fast_decode" not in full.manifest["preprocess"]  # stores made before the option resume as before
    assert fast.manifest["preprocess"]["fast_decode"] is True
    a, b = full.embeddings(mmap=False), fast.embeddings(mmap=False)
    assert not np.array_equal(a, b)  # the pixels did come from the reduced-scale decode ...
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert rel.max() < 0.05, rel  # ... and stay close to the full decode's
    with pytest.raises(StoreError, match="preprocess"):
        itae.embed(root, bb, out=tmp_path / "fast", itae=None, **COMMON)
    with pytest.raises(TypeError, match="fast_decode"):
        itae.embed(root, bb, out=tmp_path / "x", itae=None, fast_decode="yes", **COMMON)


def _spy_on_compile(monkeypatch) -> list[bool]:
    """Record each compiled_blocks entry: whether every block then had a compiled forward."""
    from itae.engine.fast import compiled_blocks

    entered: list[bool] = []
    original = compiled_blocks.__enter__

    def spy(self):
        out = original(self)
        entered.append(all(block._compiled_call_impl is not None for block in self.backbone.blocks))
        return out

    monkeypatch.setattr(compiled_blocks, "__enter__", spy)
    return entered


def test_compiled_extraction_equals_the_eager_one_and_restores_the_model(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "imgs", per_class=3, corrupt=0)
    bb = adapt(build_model())
    cfg = ITAEConfig(source="v", side="low", threshold=0.5)  # explicit: the fast CLS path (the compiled ITAE path) serves it
    entered = _spy_on_compile(monkeypatch)
    eager = itae.embed(root, bb, out=tmp_path / "eager", itae=cfg, **COMMON)
    assert entered == []
    compiled = itae.embed(root, bb, out=tmp_path / "compiled", itae=cfg, compile=True, **COMMON)
    assert entered == [True]  # the blocks ran compiled
    np.testing.assert_allclose(compiled.embeddings(mmap=False), eager.embeddings(mmap=False), rtol=1e-4, atol=1e-5)
    assert all(block._compiled_call_impl is None for block in bb.blocks)  # plain modules again


def test_default_decoding_workers_follow_the_cores_and_the_device(monkeypatch):
    from itae.extraction.options import default_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    assert default_num_workers("cuda") == 32  # a GPU must be kept fed
    assert default_num_workers("cpu") == default_num_workers() == 8  # workers take cores from a CPU model
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert default_num_workers("cuda") == default_num_workers("cpu") == 1  # one core left for the main process
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert default_num_workers("cuda") == 0


def test_out_of_memory_says_what_to_do_and_a_rerun_resumes(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=8, corrupt=0)
    bb = adapt(build_model(planted=False))
    clean = itae.embed(root, bb, out=tmp_path / "clean", itae=None, chunk_size=4, fast_cls=False, **COMMON)
    inner, calls = bb.forward_features_fn, []

    def runs_out_on_the_third_batch(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return inner(x)

    bb.forward_features_fn = runs_out_on_the_third_batch
    with pytest.raises(RuntimeError, match=r"out of cpu memory with a batch of 4 images .*smaller batch_size.*"
                                           r"1 committed chunk\(s\) are kept"):
        itae.embed(root, bb, out=tmp_path / "out", itae=None, chunk_size=4, fast_cls=False, **COMMON)
    bb.forward_features_fn = inner
    again = itae.embed(root, bb, out=tmp_path / "out", itae=None, chunk_size=4, fast_cls=False,
                       **{**COMMON, "batch_size": 2})  # a smaller batch on resume is allowed
    np.testing.assert_allclose(again.embeddings(mmap=False), clean.embeddings(mmap=False), rtol=1e-5, atol=1e-6)


def test_progress_is_committed_by_time_and_count_and_a_kill_keeps_it(tmp_path, monkeypatch):
    """One 4,096-image chunk would commit nothing until it is full. With the time rule (a fake clock that
    moves 10 s per batch, save_interval 25 s) parts are committed as the chunk fills; a run that dies
    after them resumes after the last part, recomputing none of it, and ends with the same store."""
    from itae.extraction import chunks as extract_mod

    root = _make_folder(tmp_path / "imgs", per_class=10, corrupt=1)  # 21 records, batches of 4
    now = [0.0]
    monkeypatch.setattr(extract_mod, "_clock", lambda: now[0])
    bb = adapt(build_model(planted=False))
    real_forward = bb.forward_features
    seen: list[int] = []

    def forward(x):
        now[0] += 10.0
        seen.append(len(x))
        if sum(seen) > 12:  # dies in its fourth batch
            raise KeyboardInterrupt
        return real_forward(x)

    monkeypatch.setattr(bb, "forward_features", forward)
    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        itae.embed(root, bb, out=store, itae=None, save_interval=25.0, fast_cls=False, **COMMON)
    parts = sorted(p.name for p in store.glob("chunk-00000.part-*.npz"))
    # one batch is in flight: batch 2 is finished once batch 3 ran, at 30 s > 25 s; batch 3 never finished
    assert parts == ["chunk-00000.part-0000000000-0000000008.npz"]
    counted: list[int] = []
    monkeypatch.setattr(bb, "forward_features", lambda x: counted.append(len(x)) or real_forward(x))
    resumed = itae.embed(root, bb, out=store, itae=None, save_interval=25.0, fast_cls=False, **COMMON)
    assert sum(counted) == 21 - 8 - 1  # only the records after the part (less the broken one)
    assert not list(store.glob("chunk-*.npz"))
    monkeypatch.setattr(bb, "forward_features", real_forward)
    clean = itae.embed(root, bb, out=tmp_path / "clean", itae=None, fast_cls=False, **COMMON)
    for name in ("records.csv", "errors.csv", "embeddings.npy"):
        assert (store / name).read_bytes() == (clean.path / name).read_bytes(), name
    assert len(resumed) == 20

    # by count: every 8 images (two batches), whatever the clock says
    now[0] = 0.0
    written: list[str] = []
    real_write = extract_mod.StoreWriter.write_part

    def write_part(self, k, start, stop, *a, **kw):
        written.append(f"{start}-{stop}")
        return real_write(self, k, start, stop, *a, **kw)

    monkeypatch.setattr(extract_mod.StoreWriter, "write_part", write_part)
    itae.embed(root, bb, out=tmp_path / "count", itae=None, save_every=8, fast_cls=False, **COMMON)
    assert written == ["0-8", "8-16"]

# ------------------------------------------------------------- calibration's work reused by extraction


@contextmanager
def _images_through(block: torch.nn.Module):
    """Count the images that enter ``block`` (its forward pre-hook sees (B, T, D) tokens)."""
    seen = [0]
    handle = block.register_forward_pre_hook(lambda _m, args: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    try:
        yield seen
    finally:
        handle.remove()


def _planted(family: str, registers: int = 0, depth: int = 3):
    from itae.models.planted import plant_artifacts

    model = tiny_model(family, registers=registers, depth=depth, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lambda1", "lambda2", "gamma")):
                p.fill_(1.0)
    plant_artifacts(model, [2, 9])
    return model.eval()


REUSE_CASES = {
    "cls-fast": dict(),
    "mean": dict(feature="mean"),
    "cls+mean-normalized": dict(feature="cls+mean", normalize=True),
    "hooks": dict(fast_cls=False),
    "second-to-last-block": dict(itae=ITAEConfig(layers=(-2,))),
    "two-blocks": dict(itae=ITAEConfig(layers=(1, -1))),
    "all-rows": dict(itae=ITAEConfig(rows="all")),
    "bf16": dict(precision="bf16"),
    "fp8": dict(precision="fp8"),
}


@pytest.mark.parametrize("family,registers", [("hf", 0), ("timm", 4), ("hub", 0)], ids=["hf", "timm-reg4", "hub"])
@pytest.mark.parametrize("case", list(REUSE_CASES))
def test_calibrated_images_start_at_the_engineered_block_and_match_a_fresh_embedding(tmp_path, case, family,
                                                                                      registers):
    if family != "hf" and case not in ("cls-fast", "hooks", "second-to-last-block"):
        pytest.skip("the other options are covered on the HF model")
    root = _make_folder(tmp_path / "imgs", per_class=8, corrupt=0)  # 16 images, 4 batches of 4
    kw = dict(COMMON) | REUSE_CASES[case]
    requested = kw.pop("itae", ITAEConfig())
    bb = adapt(_planted(family, registers))
    with _images_through(bb.blocks[0]) as seen:
        reused = itae.embed(root, bb, out=tmp_path / "reused", itae=requested, calibration_images=8, **kw)
    # 8 images calibrated in 2 whole batches, kept at the first engineered block: block 0 (which comes
    # before it, or is it) sees every image once, as without ITAE, and never twice.
    assert seen[0] == 16
    assert reused.manifest["calibration"]["images"] == 8
    cfg = reused.itae_config
    assert cfg.is_calibrated and cfg.layers == requested.layers
    # the same thresholds given as numbers: no calibration, every image from its pixels (a new instance:
    # embed casts and quantizes the one it is given)
    bb = adapt(_planted(family, registers))
    with _images_through(bb.blocks[0]) as seen:
        fresh = itae.embed(root, bb, out=tmp_path / "fresh", itae=cfg, **kw)
    assert seen[0] == 16
    np.testing.assert_array_equal(reused.embeddings(mmap=False), fresh.embeddings(mmap=False))
    assert reused.ids == fresh.ids
    if case == "cls-fast" and family == "hf":
        off = itae.embed(root, bb, out=tmp_path / "off", itae=None, **COMMON)
        assert not np.allclose(reused.embeddings(mmap=False), off.embeddings(mmap=False), atol=1e-3)  # ITAE acted


def test_kept_tokens_are_bounded_and_images_beyond_the_bound_come_from_their_pixels(tmp_path, monkeypatch):
    import itae.extraction.sampling as extract

    root = _make_folder(tmp_path / "imgs", per_class=8, corrupt=1)  # 17 records, one undecodable
    bb = adapt(_planted("hf"))
    one_batch = 4 * 17 * 32 * 4  # 4 images x 17 tokens x 32 dims, float32
    monkeypatch.setattr(extract, "KEEP_BYTES", one_batch)
    with _images_through(bb.blocks[0]) as seen:
        bounded = itae.embed(root, bb, out=tmp_path / "bounded", calibration_images=8, **COMMON)
    assert seen[0] == 16 + 4  # the second calibrated batch did not fit: embedded again from its pixels
    fresh = itae.embed(root, bb, out=tmp_path / "fresh", itae=bounded.itae_config, **COMMON)
    np.testing.assert_array_equal(bounded.embeddings(mmap=False), fresh.embeddings(mmap=False))
    assert bounded.errors == fresh.errors and len(bounded.errors) == 1


def test_compile_embeds_calibrated_images_again_from_their_pixels(tmp_path, monkeypatch):
    """Compiled blocks round differently from the eager calibration pass: nothing is reused with compile."""
    root = _make_folder(tmp_path / "imgs", per_class=4, corrupt=0)
    bb = adapt(_planted("hf"))
    _spy_on_compile(monkeypatch)
    with _images_through(bb.blocks[0]) as seen:
        store = itae.embed(root, bb, out=tmp_path / "c", calibration_images=4, compile=True, **COMMON)
    assert seen[0] == 8 + 4
    eager = itae.embed(root, bb, out=tmp_path / "e", itae=store.itae_config, **COMMON)
    np.testing.assert_allclose(store.embeddings(mmap=False), eager.embeddings(mmap=False), rtol=1e-4, atol=1e-5)


def test_a_calibration_with_other_forwards_than_batches_keeps_nothing():
    from itae.extraction.sampling import KeptBatches, _keep

    def record(start, n):
        return {"index": torch.arange(start, start + n), "failed_index": [], "failed_reason": [], "pixels": None}

    fed = [(record(0, 4), True), (record(8, 3), True), (record(4, 2), False)]
    tokens = [torch.zeros(4, 5, 2), torch.zeros(3, 5, 2), torch.zeros(2, 5, 2)]
    kept = KeptBatches(start=1)
    _keep(kept, tokens, fed, [])
    assert sorted(kept.batches) == [0, 8]  # the batch cut short is not kept: extraction runs it whole
    kept = KeptBatches(start=1)
    _keep(kept, tokens + tokens, fed, [record(12, 0) | {"failed_index": [12], "failed_reason": ["bad"]}])
    assert sorted(kept.batches) == [12]  # two forwards per batch: which tokens are whose is unknown
