"""Early exit under tensor parallelism (issue 21), the CPU part: two processes on gloo.

A tiny Llama (4 layers, hidden 64, 4 heads, 2 KV heads) is saved once and loaded
tensor-parallel by transformers (``from_pretrained(..., distributed_config=
DistributedConfig(tp_plan="auto"))``: q/k/v, gate/up colwise, o/down rowwise, the
embedding and lm_head vocab-sharded; each rank holds 2 query heads and 1 KV head). Every
rank also loads the same weights unsharded, and everything the tensor-parallel model
compiles is compared with :mod:`tide_compile.reference` on that unsharded model.

The module is its own worker: the fixture runs it under ``torchrun --nproc-per-node 2``
once (one launch, every case, ~20-30 s on a 2-core CPU), each rank writes its results
as JSON, and the tests below read them. The worker checks what one rank can check
(logits against the reference, its cache shard against the reference cache's heads);
the tests compare the two ranks' records (lockstep).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

WORLD = 2
LAYERS = 4
_TIMEOUT_S = 240


# ---------------------------------------------------------------------- pytest side
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run the worker on two gloo ranks; each rank's results (case -> record)."""
    out = tmp_path_factory.mktemp("tp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={WORLD}", __file__, str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the two-rank worker ran past {_TIMEOUT_S} s (a rank left waiting in a "
                    f"collective?)\n{(e.stdout or '')[-4000:]}{(e.stderr or '')[-4000:]}")
    files = [out / f"rank{r}.json" for r in range(WORLD)]
    if proc.returncode != 0 or not all(f.exists() for f in files):
        pytest.fail(f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads(f.read_text()) for f in files]


def _run_script(script: str, args: list[str], out: Path, **env: str):
    """``benchmarks/<script>`` under ``torchrun --nproc-per-node WORLD`` (gloo): the
    finished process and the JSON it wrote to ``out``."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={WORLD}", str(root / "benchmarks" / script), *args,
           "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                    **env},
                          capture_output=True, text=True, timeout=_TIMEOUT_S)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


def test_bench_tp_generate_loop_smoke(tmp_path):
    """benchmarks/bench_tp.py on two gloo ranks in its tiny mode with ``--loop generate
    --unguarded`` (tide through optimize(...).generate, the baseline's steps unguarded):
    the rows run, lockstep holds, and the exit row runs fewer layers (FX graphs: a check of
    the loops, not a measurement)."""
    proc, result = _run_script(
        "bench_tp.py", ["--tiny", "--no-inductor", "--steps", "4", "--warmup", "1", "--pairs",
                        "1", "--prompt", "8", "--rows", "never,exits", "--depths", "4", "--loop",
                        "generate", "--unguarded", "--profile", "tide_exit@4",
                        "--model-dir", str(tmp_path / "model")], tmp_path / "tp.json")
    assert result["env"]["loop"] == "generate" and result["env"]["unguarded"]
    assert result["env"]["kv"] == "propagate"
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"eager_backend_tp", "tide_never_exit", "tide_exit@4"}
    assert all(rows[n]["lockstep"] for n in ("tide_never_exit", "tide_exit@4"))
    # the prompt (8 tokens) runs all 8 layers, the 4 decode steps 4 each
    assert rows["tide_never_exit"]["mean_layers_executed"] == 8.0
    assert rows["tide_exit@4"]["mean_layers_executed"] < 8.0
    for r in rows.values():  # both readings of the bound, the absolute one for every row
        assert r["fraction_of_bytes_bound"] == round(r["bound_ms"] / r["ms_per_token"], 3)
    # --profile under --loop generate: the row's timed generate, profiled on every rank
    assert "# profile of tide_exit@4: one generate of 4 tokens" in proc.stdout
    assert (tmp_path / "tp_tide_exit_4.trace.json").exists()


def test_bench_allreduce_smoke(tmp_path):
    """benchmarks/bench_allreduce.py on two gloo ranks (``--cpu``: the eager loop only):
    the chain runs on both ranks and rank 0 writes a per-op time (a check of the script,
    not a measurement)."""
    _, result = _run_script("bench_allreduce.py", ["--cpu", "--ops", "4", "--replays", "2"],
                            tmp_path / "allreduce.json")
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["nccl_eager"]
    assert rows[0]["world"] == WORLD and rows[0]["us_per_op"] > 0 and "error" not in rows[0]


def test_dynamo_call_overhead_tp_smoke(tmp_path):
    """benchmarks/dynamo_call_overhead.py --tp on two gloo ranks (2 layers, a few calls):
    rank 0 times the unsharded and the tensor-parallel model, and the TP graph's inputs
    include its DTensor parameters (a check of the script, not a measurement)."""
    _, result = _run_script("dynamo_call_overhead.py", ["--tp", "--layers", "2", "--calls", "3"],
                            tmp_path / "dco.json", TMPDIR=str(tmp_path))
    rows = result["rows"]
    assert set(rows) == {"single", f"tp{WORLD}"}
    assert rows["single"]["dtensor_inputs"] == 0
    # 2 layers: 7 sharded linear weights each, the embedding and lm_head
    assert rows[f"tp{WORLD}"]["dtensor_inputs"] >= 2 * 7
    assert all(r["guarded_us"] > 0 and r["unguarded_us"] > 0 for r in rows.values())


def _case(ranks: list[dict], name: str) -> list[dict]:
    records = [r[name] for r in ranks]
    for rank, rec in enumerate(records):
        if not rec["ok"]:
            pytest.fail(f"case {name!r} failed on rank {rank}:\n{rec['error']}")
    return records


def test_model_is_tensor_parallel(ranks):
    """The graphs really are sharded: every segment all-reduces, weights are shards."""
    for rec in _case(ranks, "forced_decode"):
        assert rec["local_kv_heads"] == 1 and rec["local_q_out"] == 32
        assert all(n == 2 for n in rec["segment_all_reduces"]), rec["segment_all_reduces"]


def test_forced_exit_decode_equals_reference(ranks):
    """torch.compile(model.forward, backend="tide") on the TP model, every token exiting
    after layer 1: logits equal to the single-process reference at every step, each
    rank's cache equal to its heads of the reference cache, and layers 2-3 not run."""
    for rec in _case(ranks, "forced_decode"):
        assert rec["max_logit_diff"] < 1e-5
        assert rec["max_cache_diff"] < 1e-5
        # prompt of 6 tokens runs all 4 layers (frozen); each decode token runs 2
        assert rec["layers_executed"] == [6 * LAYERS, 2, 2, 2]
        assert rec["decode_segments_run"] == [2, 2, 2]
        assert rec["strategies"] == ["frozen", "skip", "skip", "skip"]


def test_kv_fill_and_stacked_kv_on_the_head_shard(ranks):
    """The KV-fill graphs hold no collective and only the K/V projections of the
    skipped layers, stacked (stack_kv) from this rank's shards: [layers*2, 64, 16]."""
    for rec in _case(ranks, "forced_decode"):
        for c, info in rec["kv_fills"].items():
            assert info["collectives"] == 0, (c, info)
            assert info["stacked_linear"] == 1, (c, info)
            assert info["to_local"] == 0, (c, info)
        assert rec["kv_fills"]["1"]["stack_shape"] == [4, 64, 16]  # layers 2, 3: K and V


def test_lockstep_exits(ranks):
    """Real (random) routers read from one file on both ranks, a threshold that splits
    the steps: the exit layers, the steps that skip and the logits (bitwise) are the
    same on both ranks and the exits are the reference's."""
    a, b = _case(ranks, "lockstep")
    assert a["exit_layers"] == b["exit_layers"]
    assert a["segments_run"] == b["segments_run"]
    assert a["logits_sha"] == b["logits_sha"]
    assert a["exit_layers"] == a["reference_exit_layers"]
    assert a["max_logit_diff"] < 1e-5
    runs = a["segments_run"]  # segments: layers 0 | 1 | 2 | 3 (cuts at checkpoints 0, 1, 2)
    assert {1, 2, 3, LAYERS} <= set(runs), runs  # exits at 0, 1, 2 and full-depth steps
    assert a["gathered_equal"] and b["gathered_equal"]


def test_optimize_generate_equals_reference(ranks):
    """optimize(model, routers).generate on the TP model (batch 2, forced exit after
    layer 1) generates the reference's tokens and skips on every decode step."""
    for rec in _case(ranks, "optimize_generate"):
        assert rec["sequences"] == rec["reference_sequences"]
        assert rec["steps_by_strategy"].get("skip", 0) == rec["new_tokens"] - 1
        assert rec["layers_executed_per_token"] < LAYERS


def test_optimize_defaults_deferred_kv(ranks):
    """optimize(model, routers) with its defaults (kv="deferred") on the TP model (batch 2,
    forced exit after layer 1): the deferred reference's tokens, every decode step a
    deferred step that skipped, and the same exits on both ranks."""
    a, b = _case(ranks, "optimize_deferred")
    for rec in (a, b):
        assert rec["kv"] == "deferred"
        assert rec["sequences"] == rec["reference_sequences"]
        assert rec["steps_by_strategy"].get("deferred", 0) == rec["new_tokens"] - 1
        assert rec["layers_executed"] < rec["total_tokens"] * LAYERS
    assert (a["exits_per_layer"], a["layers_executed"]) == (b["exits_per_layer"],
                                                            b["layers_executed"])


def test_lossless_equals_plain_generate(ranks):
    """mode="lossless" on the TP model: HF's greedy tokens of the unsharded model; drafts
    were made at the exit (depth 2 of 4 layers), and both ranks drafted and verified
    alike."""
    a, b = _case(ranks, "lossless")
    for rec in (a, b):
        assert rec["sequences"] == rec["plain_sequences"]
        assert rec["drafted"] > 0 and set(rec["draft_depths"]) == {"2"}
    assert {k: a[k] for k in ("drafted", "accepted", "deep_steps")} == \
        {k: b[k] for k in ("drafted", "accepted", "deep_steps")}


def test_attach_then_torch_compile(ranks):
    """tide_compile.attach(model, routers), then a plain torch.compile(model,
    backend="tide") of the TP model."""
    assert all(r["attach_compile"]["ok"] for r in ranks), [r["attach_compile"] for r in ranks]
    for rec in _case(ranks, "attach_compile"):
        assert rec["max_logit_diff"] < 1e-5
        assert rec["decode_layers_executed"] == 2


def test_dead_collectives_go_with_their_wait():
    """Single process: the KV-fill's dead-code elimination drops an all-reduce (and its
    wait and Dynamo's ``copy_`` back) whose result nothing reads, and keeps a live one.
    torch marks ``wait_tensor`` side-effectful, so without the rule every skipped layer's
    attention and MLP would stay in the KV-fill graph."""
    import torch
    import torch.distributed._functional_collectives  # noqa: F401  (marks wait_tensor)
    import torch.fx as fx

    from tide_compile.passes._fx import eliminate_dead_code

    c10d = torch.ops._c10d_functional
    g = fx.Graph()
    x = g.placeholder("x")
    partial = g.call_function(torch.ops.aten.mul.Tensor, (x, x))  # a rowwise layer's output
    reduced = g.call_function(c10d.all_reduce, (partial, "sum", "0"))
    waited = g.call_function(c10d.wait_tensor, (reduced,))
    g.call_method("copy_", (partial, waited))  # Dynamo's in-place all_reduce, functionalized
    live = g.call_function(c10d.wait_tensor, (g.call_function(c10d.all_reduce, (x, "sum", "0")),))
    g.output((live,))
    assert g.find_nodes(op="call_function", target=c10d.wait_tensor)[0].is_impure()
    eliminate_dead_code(g)
    kept = [str(n.target) for n in g.nodes if n.op in ("call_function", "call_method")]
    assert kept == ["_c10d_functional.all_reduce", "_c10d_functional.wait_tensor"], kept


# ---------------------------------------------------------------------- worker side
def _worker(out_dir: Path) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    torch.manual_seed(0)
    model_dir = out_dir / "model"
    if rank == 0:
        _save_tiny_llama(model_dir)
    dist.barrier()
    tp, ref = _load(model_dir)
    results: dict = {}
    for name, case in CASES.items():
        t0 = time.perf_counter()
        try:
            rec = {"ok": True, **case(tp, ref, out_dir)}
        except Exception:  # noqa: BLE001 - reported by the test of that case
            rec = {"ok": False, "error": traceback.format_exc()}
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = rec
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _save_tiny_llama(path: Path) -> None:
    import torch
    import transformers as T

    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                           max_position_embeddings=128)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, as tests/tiny_models.py does
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)


def _load(path: Path):
    import torch
    import transformers as T

    tp = T.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32,
        distributed_config=T.DistributedConfig(tp_plan="auto")).eval()
    ref = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tp, ref


def _cfg():
    from tide_compile import TIDEConfig

    return TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)


class _Runners:
    """Every SkipRunner built inside the ``with`` block."""

    def __enter__(self):
        from tide_compile.runtime import runner

        self.made, self._init = [], runner.SkipRunner.__init__
        made, init = self.made, self._init

        def keep(obj, *args, **kwargs):
            init(obj, *args, **kwargs)
            made.append(obj)

        runner.SkipRunner.__init__ = keep
        return self

    def __exit__(self, *exc):
        from tide_compile.runtime import runner

        runner.SkipRunner.__init__ = self._init


def _ops(gm, *names: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method")
               and any(s in str(n.target) for s in names))


def _compile(model, **options):
    import torch

    from tide_compile import ExitStats

    torch._dynamo.reset()
    stats = ExitStats(num_layers=LAYERS)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True, dynamic=False,
                       options={"inductor": False, "stats": stats, **options})
    return fn, stats


def _rank_heads(t, rank: int):
    """This rank's KV heads (dim 1) of a reference cache tensor."""
    n = t.shape[1] // WORLD
    return t[:, rank * n:(rank + 1) * n]


def case_forced_decode(tp, ref, out_dir):
    import torch
    import torch.distributed as dist
    from transformers import StaticCache

    from tide_compile import RouterSet
    from tide_compile import reference as R

    rank = dist.get_rank()
    cfg = _cfg()
    routers = RouterSet.forced(ref, exit_at=1, config=cfg)
    with _Runners() as runners:
        fn, stats = _compile(tp, routers=routers, stack_kv=True)
        c_tp = StaticCache(config=tp.config, max_cache_len=16)
        c_ref = StaticCache(config=ref.config, max_cache_len=16)
        ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
        diff, layers, strategies, segs = 0.0, [], [], []
        with torch.no_grad():
            for step in range(4):
                out = fn(input_ids=ids, past_key_values=c_tp, use_cache=True)
                r = R.forward(ref, routers, ids, cfg, past_key_values=c_ref)
                diff = max(diff, float((out.logits - r.logits).abs().max()))
                layers.append(stats.last_layers_executed)
                strategies.append(stats.last_strategy)
                if step:
                    segs.append(runners.made[-1].last_segments_run)
                ids = r.logits[:, -1:].argmax(-1)
    cache_diff = max(
        max(float((a.keys - _rank_heads(b.keys, rank)).abs().max()),
            float((a.values - _rank_heads(b.values, rank)).abs().max()))
        for a, b in zip(c_tp.layers, c_ref.layers))
    decode = runners.made[-1]
    kv_fills = {}
    for c, piece in decode.kv_fills.items():
        stacks = [b for n, b in piece.gm.named_buffers() if n.startswith("tide_kv_stack")]
        kv_fills[c] = {"collectives": _ops(piece.gm, "_c10d_functional"),
                       "stacked_linear": _ops(piece.gm, "stacked_linear"),
                       "to_local": _ops(piece.gm, "to_local"),
                       "stack_shape": list(stacks[0].shape) if stacks else None}
    attn = tp.model.layers[0].self_attn
    return {"max_logit_diff": diff, "max_cache_diff": cache_diff, "layers_executed": layers,
            "strategies": strategies, "decode_segments_run": segs, "kv_fills": kv_fills,
            "segment_all_reduces": [_ops(s.gm, "all_reduce") for s in decode.segments],
            "local_kv_heads": int(c_tp.layers[0].keys.shape[1]),
            "local_q_out": int(attn.q_proj.weight.to_local().shape[0])}


def case_lockstep(tp, ref, out_dir):
    import hashlib

    import torch
    import torch.distributed as dist
    from transformers import StaticCache

    from tide_compile import RouterSet, TokenRouter
    from tide_compile import reference as R

    rank = dist.get_rank()
    cfg = _cfg()
    path = out_dir / "random.tide"
    if rank == 0:  # one router file, read by every rank
        g = torch.Generator().manual_seed(1)
        info = RouterSet.describe(ref)
        routers = {}
        for c in cfg.checkpoint_layers(LAYERS):
            r = TokenRouter(info["hidden_size"], cfg.router_bottleneck_dim)
            with torch.no_grad():
                for p in r.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[-1] ** 0.5)
            routers[c] = r
        RouterSet(routers, model_info=info, config=cfg).save(path)
    dist.barrier()
    routers = RouterSet.load(path, model=tp)
    # At this threshold the decode steps exit at checkpoints 0, 1 and 2 and run full
    # depth (the test checks the mix): the reference's steps, teacher-forced below.
    threshold = 0.5
    c_ref = StaticCache(config=ref.config, max_cache_len=16)
    ids, steps = torch.tensor([[5, 17, 42, 8, 77, 23]]), []
    for _ in range(8):
        r = R.forward(ref, routers, ids, cfg, past_key_values=c_ref, exit_threshold=threshold)
        steps.append((ids, r))
        ids = r.logits[:, -1:].argmax(-1)
    with _Runners() as runners:
        fn, stats = _compile(tp, routers=str(path), exit_threshold=threshold)
        c_tp = StaticCache(config=tp.config, max_cache_len=16)
        exits, segs, ref_exits, diff, h = [], [], [], 0.0, hashlib.sha256()
        with torch.no_grad():
            for k, (ids, r) in enumerate(steps):  # teacher-forced on the reference's tokens
                out = fn(input_ids=ids, past_key_values=c_tp, use_cache=True)
                diff = max(diff, float((out.logits - r.logits).abs().max()))
                h.update(out.logits.numpy().tobytes())
                exits.append(stats.last_exit_layers.flatten().tolist())
                ref_exits.append(r.exit_layers.flatten().tolist())
                if k:
                    segs.append(runners.made[-1].last_segments_run)
    mine = {"exit_layers": exits, "segments_run": segs}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, mine)
    return {**mine, "reference_exit_layers": ref_exits, "max_logit_diff": diff,
            "threshold": threshold, "logits_sha": h.hexdigest(),
            "gathered_equal": all(g == mine for g in gathered)}


def case_optimize_generate(tp, ref, out_dir):
    import torch

    from tide_compile import RouterSet, optimize
    from tide_compile import reference as R

    torch._dynamo.reset()
    cfg = _cfg()
    routers = RouterSet.forced(ref, exit_at=1, config=cfg)
    fast = optimize(tp, routers, kv="propagate", inductor=False, stack_kv=True)
    ids = torch.tensor([[3, 14, 15, 92, 65], [2, 71, 82, 81, 82]])
    new = 5
    out = fast.generate(ids, max_new_tokens=new)
    r = R.generate(ref, routers, ids, new, config=cfg, cache="static")
    s = fast.tide_stats
    return {"sequences": out.tolist(), "reference_sequences": r.sequences.tolist(),
            "new_tokens": new, "steps_by_strategy": dict(s.steps_by_strategy),
            "layers_executed_per_token": s.layers_executed / max(1, s.total_tokens)}


def case_optimize_deferred(tp, ref, out_dir):
    """``optimize``'s defaults (``kv="deferred"``) on the TP model."""
    import torch

    from tide_compile import RouterSet, optimize
    from tide_compile import reference as R

    torch._dynamo.reset()
    cfg = _cfg()
    routers = RouterSet.forced(ref, exit_at=1, config=cfg)
    fast = optimize(tp, routers, inductor=False, stack_kv=True)
    ids = torch.tensor([[3, 14, 15, 92, 65], [2, 71, 82, 81, 82]])
    new = 5
    out = fast.generate(ids, max_new_tokens=new)
    r = R.generate(ref, routers, ids, new, config=cfg, cache="static", kv="deferred")
    s = fast.tide_stats
    return {"kv": fast.options.kv, "sequences": out.tolist(),
            "reference_sequences": r.sequences.tolist(), "new_tokens": new,
            "steps_by_strategy": dict(s.steps_by_strategy),
            "exits_per_layer": {str(k): v for k, v in s.exits_per_layer.items()},
            "layers_executed": s.layers_executed, "total_tokens": s.total_tokens}


def case_lossless(tp, ref, out_dir):
    """``mode="lossless"`` on the TP model: the plain model's greedy tokens, with drafts
    (random weights, so most are rejected; the output must not change)."""
    import torch

    from tide_compile import RouterSet, optimize

    torch._dynamo.reset()
    routers = RouterSet.forced(ref, exit_at=1, config=_cfg())
    fast = optimize(tp, routers, mode="lossless", inductor=False, max_pending=3)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    new = 8
    out = fast.generate(ids, max_new_tokens=new)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=new, do_sample=False)
    s = fast.lossless_stats
    return {"sequences": out.tolist(), "plain_sequences": want.tolist(),
            "drafted": s.drafted, "accepted": s.accepted, "deep_steps": s.deep_steps,
            "draft_depths": {str(k): v for k, v in s.draft_depths.items()}}


def case_attach_compile(tp, ref, out_dir):
    import torch
    from transformers import StaticCache

    import tide_compile
    from tide_compile import ExitStats, RouterSet
    from tide_compile import reference as R

    torch._dynamo.reset()
    cfg = _cfg()
    routers = RouterSet.forced(ref, exit_at=1, config=cfg)
    stats = ExitStats(num_layers=LAYERS)
    tide_compile.attach(tp, routers, inductor=False, stats=stats)
    try:
        fast = torch.compile(tp, backend="tide", fullgraph=True)
        c_tp = StaticCache(config=tp.config, max_cache_len=16)
        c_ref = StaticCache(config=ref.config, max_cache_len=16)
        ids, diff = torch.tensor([[7, 8, 9]]), 0.0
        with torch.no_grad():
            for _ in range(2):
                out = fast(input_ids=ids, past_key_values=c_tp, use_cache=True)
                r = R.forward(ref, routers, ids, cfg, past_key_values=c_ref)
                diff = max(diff, float((out.logits - r.logits).abs().max()))
                ids = r.logits[:, -1:].argmax(-1)
    finally:
        tide_compile.detach(tp)
    return {"max_logit_diff": diff, "decode_layers_executed": stats.last_layers_executed}


CASES = {"forced_decode": case_forced_decode, "lockstep": case_lockstep,
         "optimize_generate": case_optimize_generate,
         "optimize_deferred": case_optimize_deferred, "lossless": case_lossless,
         "attach_compile": case_attach_compile}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _worker(Path(sys.argv[1]))

