"""The megatron-core internals megafusion's checkpoint code overrides still have the shape it relies on
(megatron-core 0.16.1, megafusion.parallel.cpu_compat.MEGATRON_CORE_VERSION): a version bump that changes them
fails here, not as a leaked process or a hung save."""

from __future__ import annotations

import inspect
import queue

from megatron.core import package_info
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megafusion.checkpoint.dist_io import _results_in_process
from megafusion.parallel.cpu_compat import MEGATRON_CORE_VERSION


def test_the_pinned_megatron_core_is_the_targeted_one():
    assert package_info.__version__ == MEGATRON_CORE_VERSION


def test_writer_results_queue_is_the_module_global_megafusion_replaces(monkeypatch):
    # FileSystemWriterAsync takes its results queue from _get_write_results_queue(), which creates a spawned
    # Manager's queue only while the module global _results_queue is None
    source = inspect.getsource(filesystem_async._get_write_results_queue)
    assert "_results_queue" in source and "Manager()" in source
    assert "_get_write_results_queue()" in inspect.getsource(filesystem_async.FileSystemWriterAsync)
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    _results_in_process()
    replaced = filesystem_async._results_queue
    assert isinstance(replaced, queue.Queue)
    assert filesystem_async._get_write_results_queue() is replaced, "no Manager process is started"
    _results_in_process()
    assert filesystem_async._results_queue is replaced, "idempotent"


def test_router_overrides_match_their_targets():
    """ModalityRouter (megafusion/model/moe.py) overrides TopKRouter's attach_and_log_load_balancing_loss,
    apply_z_loss (which files its value under "z_loss"), routing and _apply_expert_bias (which masks the routing
    map with a flattened padding mask): the targets keep the signatures and the behaviour the overrides assume."""
    from megatron.core.transformer.moe.router import TopKRouter

    params = lambda fn: list(inspect.signature(fn).parameters)  # noqa: E731
    assert params(TopKRouter.apply_z_loss)[:3] == ["self", "logits", "padding_mask"]
    assert '"z_loss"' in inspect.getsource(TopKRouter.apply_z_loss)
    assert params(TopKRouter.routing)[:3] == ["self", "logits", "padding_mask"]
    assert params(TopKRouter.attach_and_log_load_balancing_loss)[:5] == [
        "self", "activation", "aux_loss_coeff", "aux_loss", "aux_loss_name"]
    source = inspect.getsource(TopKRouter._apply_expert_bias)
    assert "routing_map & (~padding_mask)" in source, "megatron changed how it masks: revisit the override"
    assert "padding_mask = padding_mask.reshape(-1)" in inspect.getsource(TopKRouter.routing)
