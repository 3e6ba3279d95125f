"""The Ray engine on a local Ray instance with CPU workers: the same store as the single-process path
(embeddings, ids and order, labels, errors, manifest), with ITAE calibrated and without, through the API and
the CLI, and resuming a store that the local path left unfinished."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import itae
from itae.data.store import MANIFEST, EmbeddingStore, StoreError, StoreWriter, chunk_name, read_manifest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from itae.distributed import embed_ray  # noqa: E402

from .helpers.tiny import tiny_model  # noqa: E402

pytestmark = pytest.mark.ray

RES = 56  # crop fed to the tiny model (4 x 4 patches of 14)
# 41 records (one corrupt) in chunks of 16: three chunks, the last one short; batches of 8.
COMMON = dict(batch_size=8, chunk_size=16, resolution=RES, calibration_images=16, labels="from-folders",
              progress=False)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, model folder): 40 images in two class folders plus one corrupt file; a tiny HF model
    with two planted attention sinks, so that calibration finds a valley and ITAE changes the embeddings."""
    from itae.models.planted import plant_artifacts

    root = tmp_path_factory.mktemp("ray-data")
    images = root / "images"
    for c, name in enumerate(["cat", "dog"]):
        (images / name).mkdir(parents=True)
        for i in range(20):
            _image(100 * c + i).save(images / name / f"{i:03d}.png")
    (images / "cat" / "010-broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    model = tiny_model("hf", seed=0)
    plant_artifacts(model, [2, 9])
    model.save_pretrained(str(root / "model"))
    return images, root / "model"


@pytest.fixture(scope="module")
def ray_instance():
    """One small local Ray instance for the module (CPU workers only); left alone if one already runs."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _local(images: Path, model: Path, out: Path, **kw):
    options = {**COMMON, "num_workers": 0, **kw}
    return itae.embed(images, str(model), out=out, **options)


def _assert_same_store(got, ref, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(got.embeddings()), np.asarray(ref.embeddings()), rtol=0, atol=atol)
    assert got.ids == ref.ids
    np.testing.assert_array_equal(got.indices, ref.indices)
    assert got.labels == ref.labels
    assert got.errors == ref.errors
    assert (got.path / "errors.csv").read_bytes() == (ref.path / "errors.csv").read_bytes()


# ------------------------------------------------------------------------------ no Ray instance needed


def test_without_ray_installed_the_error_says_what_to_install(data, tmp_path, monkeypatch):
    images, model = data
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "itae\[ray\]"'):
        embed_ray(images, model, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(num_actors=0), ValueError, "num_actors"),
        (dict(num_decoders=-1), ValueError, "num_decoders"),
        (dict(feature="max"), ValueError, "feature"),
        (dict(itae="auto"), TypeError, "ITAEConfig"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(data, tmp_path, kw, error, match):
    images, model = data
    with pytest.raises(error, match=match):
        embed_ray(images, model, out=tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_a_model_instance_is_refused_with_a_pointer_to_the_local_engine(data, tmp_path):
    images, _ = data
    with pytest.raises(TypeError, match="itae.embed"):
        embed_ray(images, tiny_model("hf"), out=tmp_path / "out")


def test_when_nothing_decodes_calibration_fails_on_the_driver_and_lists_why(data, tmp_path):
    _, model = data
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="none of the 3 images"):
        embed_ray(bad, model, out=tmp_path / "out", **{**COMMON, "labels": "none"})
    assert len((tmp_path / "out" / "errors.csv").read_text().splitlines()) == 4  # header + 3
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_model_stage_in_process_keeps_row_shape_when_a_whole_batch_fails(data, tmp_path):
    """The actor class on its own (no Ray): decoding inside it, failed rows zero with their reason."""
    from itae.data.sources import open_source
    from itae.distributed.ray_embed import _Embedder

    images, model = data
    ref = _local(images, model, tmp_path / "local", itae=None)
    preprocess = itae.load_backbone(str(model), resolution=RES).preprocess
    stage = _Embedder(str(model), None, "fp32", RES, None, "cls", False, True, preprocess,
                      decode=dict(source=open_source(images), preprocess=preprocess, max_pixels=None))
    out = stage({"item": np.array([10])})  # only the corrupt file
    assert out["embedding"].shape == (1, 32) and not out["embedding"].any()
    assert list(out["reason"]) == ["not an image (unrecognised format)"]
    out = stage({"item": np.array([9, 10, 11])})
    assert list(out["index"]) == [9, 10, 11] and [r == "" for r in out["reason"]] == [True, False, True]
    # Records 9 and 11 are rows 9 and 10 of the store (record 10 has no row).
    np.testing.assert_allclose(out["embedding"][[0, 2]], np.asarray(ref.embeddings())[[9, 10]], rtol=0,
                               atol=1e-5)
    # ITAE through the hooks (fast_cls=False) with the local store's calibrated config: its embeddings.
    ref_itae = _local(images, model, tmp_path / "local-itae")
    hooked = _Embedder(str(model), None, "fp32", RES, ref_itae.manifest["itae"], "cls", False, False,
                       preprocess, decode=dict(source=open_source(images), preprocess=preprocess,
                                               max_pixels=None))
    assert not hooked.fast
    out = hooked({"item": np.array([9, 10, 11])})
    np.testing.assert_allclose(out["embedding"][[0, 2]], np.asarray(ref_itae.embeddings())[[9, 10]], rtol=0,
                               atol=1e-5)


def test_model_stage_in_process_compiles_and_decodes_at_reduced_scale_like_the_local_path(data, tmp_path):
    """compile and fast_decode in the actor class (no Ray): the local engine's embeddings for both."""
    from itae.data.sources import open_source
    from itae.distributed.ray_embed import _Embedder

    _, model = data
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        coarse = np.random.default_rng(i).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((320, 240), Image.Resampling.BICUBIC).save(photos / f"{i}.jpg")
    ref = _local(photos, model, tmp_path / "local", itae=None, labels="none", fast_decode=True, compile=True)
    assert ref.manifest["preprocess"]["fast_decode"] is True
    preprocess = itae.load_backbone(str(model), resolution=RES).preprocess
    decode = dict(source=open_source(photos), preprocess=preprocess, max_pixels=None, fast_decode=True)
    stage = _Embedder(str(model), None, "fp32", RES, None, "cls", False, True, preprocess, decode=decode,
                      compile=True)
    assert all(block._compiled_call_impl is not None for block in stage.backbone.blocks)
    out = stage({"item": np.arange(3)})
    np.testing.assert_allclose(out["embedding"], np.asarray(ref.embeddings()), rtol=0, atol=1e-5)
    full = _local(photos, model, tmp_path / "full", itae=None, labels="none")
    assert not np.allclose(np.asarray(full.embeddings()), out["embedding"], rtol=0, atol=1e-6)


def test_model_stage_in_process_with_fp8_equals_the_local_fp8_store(data, tmp_path):
    from itae.data.sources import open_source
    from itae.distributed.ray_embed import _Embedder
    from itae.models.fp8 import is_fp8

    images, model = data
    ref = _local(images, model, tmp_path / "local", itae=None, precision="fp8")
    assert ref.manifest["precision"] == "fp8"
    preprocess = itae.load_backbone(str(model), resolution=RES).preprocess
    stage = _Embedder(str(model), None, "fp8", RES, None, "cls", False, True, preprocess,
                      decode=dict(source=open_source(images), preprocess=preprocess, max_pixels=None))
    assert is_fp8(stage.backbone)
    out = stage({"item": np.array([0, 1, 2])})
    np.testing.assert_allclose(out["embedding"], np.asarray(ref.embeddings())[:3], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------- local Ray instance


def test_ray_store_equals_the_local_store_with_itae_auto(data, tmp_path, ray_instance, monkeypatch):
    import itae.distributed.ray_embed as local

    images, model = data
    ref = _local(images, model, tmp_path / "local")
    base = _local(images, model, tmp_path / "local-base", itae=None)
    served = []
    embed_kept = local.embed_kept

    def spy(*args, **kw):
        for batch, emb in embed_kept(*args, **kw):
            served.extend(batch["index"].tolist())
            yield batch, emb

    monkeypatch.setattr(local, "embed_kept", spy)
    # A separate decoding stage, as with GPU replicas (CPU replicas decode themselves by default).
    got = embed_ray(images, model, out=tmp_path / "ray", num_actors=1, num_decoders=1, **COMMON)

    assert got.is_complete and len(got) == 40
    _assert_same_store(got, ref)
    # The calibrated batches (records 0-7, 8-15 but the corrupt 10, and 40) were embedded on the driver from
    # the tokens calibration kept, as the local engine embeds them: the same numbers, bit for bit.
    assert sorted(served) == [i for i in range(16) if i != 10] + [40]
    rows = np.isin(got.indices, served)
    np.testing.assert_array_equal(np.asarray(got.embeddings())[rows], np.asarray(ref.embeddings())[rows])
    assert got.errors == [(10, "cat/010-broken.jpg", "not an image (unrecognised format)")]
    # The same calibration (same images, same order), so the same resolved config in the manifest.
    cfg = got.itae_config
    assert cfg is not None and cfg.is_calibrated and cfg == ref.itae_config
    assert got.manifest["engine"] == "ray" and "engine" not in ref.manifest
    assert {k: v for k, v in got.manifest.items() if k != "engine"} == ref.manifest
    # ITAE did change the embeddings (the comparison above is not between two unmodified models).
    assert not np.allclose(np.asarray(got.embeddings()), np.asarray(base.embeddings()), atol=1e-3)

    # A complete store with the same settings is returned as it is; other settings are refused.
    before = (tmp_path / "ray" / "embeddings.npy").stat().st_mtime_ns
    assert embed_ray(images, model, out=tmp_path / "ray", **COMMON).is_complete
    assert (tmp_path / "ray" / "embeddings.npy").stat().st_mtime_ns == before
    with pytest.raises(StoreError, match="other settings.*itae_requested"):
        embed_ray(images, model, out=tmp_path / "ray", itae=None, **COMMON)
    # ... and the local engine accepts the Ray store as its own.
    assert _local(images, model, tmp_path / "ray").is_complete


def test_cli_ray_engine_without_itae_equals_the_local_store(data, tmp_path, ray_instance, capsys):
    from itae.cli.main import main

    images, model = data
    ref = itae.embed(images, str(model), out=tmp_path / "local", itae=None, batch_size=8, resolution=RES,
                     num_workers=0, progress=False)
    code = main(["embed", str(images), "-o", str(tmp_path / "ray"), "--engine", "ray", "--model", str(model),
                 "--no-itae", "--resolution", str(RES), "--batch-size", "8", "--no-progress",
                 "--ray-decoders", "1", "--ray-gpus-per-actor", "0"])
    assert code == 0, capsys.readouterr().err
    assert "40 images embedded, 1 could not be decoded" in capsys.readouterr().out
    got = EmbeddingStore(tmp_path / "ray")
    assert got.itae_config is None
    _assert_same_store(got, ref)


def test_ray_resumes_a_store_the_local_path_left_unfinished(data, tmp_path, ray_instance, monkeypatch):
    images, model = data
    ref = _local(images, model, tmp_path / "local")
    out = tmp_path / "partial"

    # A local run that dies before consolidating: all three chunks committed, manifest incomplete.
    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "finalize", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _local(images, model, out)
    assert sorted(p.name for p in out.glob("chunk-*.npz")) == [chunk_name(k) for k in range(3)]
    # Chunk 2 is lost; chunk 0 is rewritten with doubled embeddings, so its rows in the result show
    # whether the resumed run took the committed chunk as it is (it must) or recomputed it.
    (out / chunk_name(2)).unlink()
    manifest = read_manifest(out)
    writer = StoreWriter(out, manifest)
    with np.load(out / chunk_name(0)) as z:
        c0 = {key: z[key] for key in z.files}
    writer.write_chunk(0, c0["index"], c0["ids"].tolist(), c0["labels"].tolist(), 2 * c0["embeddings"],
                       c0["failed_index"].tolist(), c0["failed_ids"].tolist(), c0["failed_reason"].tolist())

    got = embed_ray(images, model, out=out, **COMMON)  # CPU replica: decoding inside the model actor

    assert got.is_complete and got.ids == ref.ids and got.errors == ref.errors
    assert got.itae_config == ref.itae_config  # the stored thresholds, not a new calibration
    assert "engine" not in got.manifest  # the local run's manifest is kept
    emb, expected = np.asarray(got.embeddings()), np.asarray(ref.embeddings())
    in_chunk0 = got.indices < 16
    np.testing.assert_allclose(emb[in_chunk0], 2 * expected[in_chunk0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(emb[~in_chunk0], expected[~in_chunk0], rtol=0, atol=1e-5)


def test_ray_over_webdataset_shards_equals_the_local_store(data, tmp_path, ray_instance):
    """WebDataset shards (a brace pattern over two .tar files, labels from .cls members) through Ray: the
    same embeddings, ids, order and labels as the single-process path over the same shards."""
    import io
    import tarfile

    images, model = data
    files = sorted(p for p in images.rglob("*") if p.is_file() and "broken" not in p.name)
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tar:
            for i, path in enumerate(files[s::2]):
                for ext, payload in (("png", path.read_bytes()), ("cls", path.parent.name.encode())):
                    info = tarfile.TarInfo(f"{s}{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    spec = str(tmp_path / "shard-{000..001}.tar")
    options = {**COMMON, "labels": "column"}
    ref = itae.embed(spec, str(model), out=tmp_path / "local", num_workers=0, **options)
    got = embed_ray(spec, model, out=tmp_path / "ray", num_actors=1, **options)

    assert got.is_complete and len(got) == len(files) == 40 and got.errors == []
    assert sorted(set(got.labels)) == ["cat", "dog"]
    _assert_same_store(got, ref)
