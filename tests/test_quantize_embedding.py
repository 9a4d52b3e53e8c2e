"""Issue #12, int8 token embedding table: the prior's ``embed_tokens`` is stored in int8 (one scale per row) and
looked up row by row (``quantize.Int8Embedding``), exactly; pre-quantised directories carry a format version
(2 stores the table in int8; 1, written before, still loads with its table as stored; a newer one is refused)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitdance_core.families.text_to_image.loader import load_model
from bitdance_core.families.text_to_image.pipeline import BitDancePipeline
from bitdance_core.families.text_to_image.quantized_checkpoint import write_quantized
from bitdance_core.loading import quantize as q
from bitdance_core.loading.io import CheckpointError

FIXTURE = Path(__file__).parent / "fixtures" / "reference-tiny-a"
ARGS = dict(prompt="a red circle", height=64, width=64, steps=3, guidance_scale=2.0, seed=5)
EMB = "model.embed_tokens"


@pytest.fixture(scope="module")
def int8_model():
    return load_model(FIXTURE, device="cpu", quantize="int8")


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    return write_quantized(FIXTURE, tmp_path_factory.mktemp("q") / "int8", "int8")


def test_int8_embedding_gathers_then_dequantises_exactly(int8_model):
    """The lookup equals dequantise(int8 table)[ids] bit for bit, for any id shape, and never dequantises the
    whole table (torchao's own Int8Tensor embedding does: that path must not be taken)."""
    emb = int8_model.llm.embed_tokens
    table = emb.weight.dequantize()
    vocab = table.shape[0]
    g = torch.Generator().manual_seed(0)
    for ids in (torch.tensor([0, vocab - 1, 5, 5]), torch.randint(0, vocab, (3, 7), generator=g),
                torch.zeros(0, dtype=torch.long)):
        out = emb(ids)
        assert out.dtype == torch.float32 and out.shape == (*ids.shape, table.shape[1])
        assert torch.equal(out, table[ids])
    calls = []
    real = type(emb.weight).dequantize
    type(emb.weight).dequantize = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    try:
        emb(torch.tensor([1, 2, 3]))
    finally:
        type(emb.weight).dequantize = real
    assert not calls
    # bfloat16 placement: the rows come out in the compute dtype, equal to the table dequantised in it
    w = q.quantize_weight(table, "int8", "cpu", torch.bfloat16)
    e16 = q.Int8Embedding(*table.shape, w)
    ids = torch.tensor([[3, 1], [4, 1]])
    assert e16(ids).dtype == torch.bfloat16 and torch.equal(e16(ids), w.dequantize()[ids])


def test_int8_chunked_quantisation_equals_one_go(monkeypatch):
    w = torch.randn(37, 24, generator=torch.Generator().manual_seed(1))
    one = q.quantize_weight(w, "int8", "cpu", torch.float32)
    monkeypatch.setattr(q, "_CHUNK_ELEMENTS", 24 * 5)  # 5 rows at a time, a ragged last chunk
    chunked = q.quantize_weight(w, "int8", "cpu", torch.float32)
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(one, name), getattr(chunked, name)), name
    assert chunked.block_size == one.block_size and torch.equal(chunked.dequantize(), one.dequantize())



def _format1(dst: Path, int8_dir: Path) -> Path:
    """An int8 directory as bitdance wrote it before format 2: embedding table as in the source, no version."""
    d = dst / "v1"
    shutil.copytree(int8_dir, d)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        meta = dict(f.metadata())
    state = load_file(d / "model.safetensors")
    for n in ("qdata", "scale", "zero_point"):
        del state[f"{EMB}._weight_{n}"]
    meta.pop(f"{EMB}.weight")
    meta["tensor_names"] = json.dumps([k for k in json.loads(meta["tensor_names"]) if k != f"{EMB}.weight"])
    state[f"{EMB}.weight"] = load_file(FIXTURE / "model.safetensors")[f"{EMB}.weight"]
    save_file(state, d / "model.safetensors", meta)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]["bitdance_format"]
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_prequantized_directory_stores_the_int8_table(int8_dir, int8_model):
    qc = json.loads((int8_dir / "config.json").read_text())["quantization_config"]
    assert qc["bitdance_format"] == 2 and EMB in qc["quantized_modules"]
    with safe_open(str(int8_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
        assert f.get_slice(f"{EMB}._weight_qdata").get_dtype() == "I8" and f"{EMB}.weight" not in keys
    m = load_model(int8_dir, device="cpu")
    assert isinstance(m.llm.embed_tokens, q.Int8Embedding)
    got, ref = m.llm.embed_tokens.weight, int8_model.llm.embed_tokens.weight
    assert torch.equal(got.qdata, ref.qdata) and torch.equal(got.scale, ref.scale)


def test_format1_directory_loads_with_its_table_as_stored(tmp_path, int8_dir, caplog):
    d = _format1(tmp_path, int8_dir)
    with caplog.at_level("WARNING"):
        m = load_model(d, device="cpu")
    assert "format 1" in caplog.text and "re-run `bitdance quantize`" in caplog.text
    assert type(m.llm.embed_tokens) is torch.nn.Embedding and q.mode_of(m.llm.embed_tokens.weight) == "none"
    assert torch.equal(m.llm.embed_tokens.weight, load_file(FIXTURE / "model.safetensors")[f"{EMB}.weight"].float())
    assert q.mode_of(m.llm.layers[0].mlp.up_proj.weight) == "int8"
    # same linears, exact table: the image of a quantise-at-load with a float table
    ref = load_model(FIXTURE, device="cpu", quantize="int8")
    ref.llm.embed_tokens = m.llm.embed_tokens
    a, b = BitDancePipeline(m)(**ARGS), BitDancePipeline(ref)(**ARGS)
    assert torch.equal(a.tokens, b.tokens)
    # strict within its format: a format-2 directory whose table is not quantised names the key
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bitdance_format"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.embed_tokens\._weight_qdata"):
        load_model(d, device="cpu")


@pytest.mark.parametrize("version", [3, "2", 0])
def test_unknown_format_is_refused_by_name(tmp_path, int8_dir, version):
    d = tmp_path / "v"
    shutil.copytree(int8_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bitdance_format"] = version
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config\.bitdance_format .* formats 1 to 2"):
        load_model(d, device="cpu")
