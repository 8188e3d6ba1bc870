"""NaN guard: every rank agrees on a non-finite loss term or gradient norm seen by one rank; skip leaves the
state unchanged and counts (a checkpoint after a skipped step is allowed: it holds the last good state), halt
raises naming step, rank and term."""

import json
import math
import os

import pytest
import torch

from distributed import run_distributed
from megafusion.checkpoint.checkpointer import CheckpointRefused
from megafusion.training.nan_guard import NanGuard, NonFiniteError, check_finite


def test_single_process_verdicts():
    assert check_finite({"ce": 1.0, "fm": torch.tensor([0.5, 0.25])}, 2.0).ok
    bad = check_finite({"ce": float("inf"), "fm": torch.tensor(0.1)}, torch.tensor(float("nan")))
    assert not bad.ok and bad.bad_terms == ["ce", "grad_norm"] and bad.bad_ranks == [0]
    with pytest.raises(ValueError, match="training.nan_policy"):
        NanGuard("ignore")


def _guard_worker(rank, world_size, out_dir):
    for policy in ("skip", "halt"):
        _run_policy(rank, out_dir, policy)


def _run_policy(rank, out_dir, policy):
    guard = NanGuard(policy)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    history, refused, error = [], [], None
    try:
        for step in range(5):
            opt.zero_grad()
            loss = (w * (step + 1)).sum()
            loss.backward()
            fm = torch.tensor(float("nan")) if (rank == 1 and step == 2) else torch.tensor(0.5)
            # pipeline-style: rank 0 passes no fm term at all
            losses = {"ce": loss.detach()} if rank == 0 else {"ce": loss.detach(), "fm": fm}
            grad_norm = float("inf") if (rank == 0 and step == 3) else w.grad.norm().item()
            if guard.check(step, losses, grad_norm):
                opt.step()
            try:
                guard.assert_checkpoint_allowed(step)
                refused.append(False)
            except CheckpointRefused:
                refused.append(True)
            history.append(w.detach().tolist())
    except NonFiniteError as exc:
        error = str(exc)
    with open(os.path.join(out_dir, f"{policy}{rank}.json"), "w") as f:
        json.dump({"history": history, "skipped": guard.skipped, "refused": refused, "error": error,
                   "last_terms": guard.last_check.bad_terms if guard.last_check else None}, f)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan_guard")
    run_distributed(_guard_worker, world_size=2, args=(str(out),))  # one launch for both policies
    return out


@pytest.mark.distributed
def test_skip_policy_agrees_and_keeps_state(two_rank_results):
    tmp_path = two_rank_results
    r0, r1 = (json.loads((tmp_path / f"skip{r}.json").read_text()) for r in range(2))
    assert r0["history"] == r1["history"]  # both ranks applied exactly the same updates
    h = r0["history"]
    assert h[2] == h[1] and h[3] == h[2]  # steps 2 (rank 1 fm NaN) and 3 (rank 0 grad norm Inf) skipped
    assert h[1] != h[0] and h[4] != h[3]
    assert r0["skipped"] == r1["skipped"] == 2
    assert r0["refused"] == r1["refused"] == [False] * 5  # skipped steps left the last good state: saveable
    assert r0["error"] is None and r1["error"] is None


@pytest.mark.distributed
def test_halt_policy_raises_on_every_rank_naming_step_rank_and_term(two_rank_results):
    tmp_path = two_rank_results
    for rank in range(2):
        r = json.loads((tmp_path / f"halt{rank}.json").read_text())
        assert len(r["history"]) == 2  # halted in step 2, before its update
        assert "step 2" in r["error"] and "rank(s) 1" in r["error"] and "fm" in r["error"]
        assert "training.nan_policy=skip" in r["error"]
        assert not math.isnan(r["history"][-1][0])
