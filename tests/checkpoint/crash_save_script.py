"""Helper process of test_crash.py (run as a script: dist_checkpointing's writer re-imports __main__).

    python crash_save_script.py save   ROOT   publish step 1, then hang inside the save of step 2 (after every shard
                                             is written, before publication) until the test kills it with SIGKILL
    python crash_save_script.py resume ROOT   checkpoint.load=auto, check what was restored, save step 2 again
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(mode: str, root: str) -> None:
    import torch
    from ckpt_harness import build, full_weights, make_cfg, train_step

    from megafusion.checkpoint import TrainState, publish, resume, save_checkpoint

    cfg = make_cfg(tp=1)
    if mode == "save":
        chunks, optimizer, scheduler = build(cfg, seed=1)
        train_step(chunks, optimizer, scheduler, 0)
        save_checkpoint(root, TrainState(step=1, consumed_samples=4), chunks, optimizer, scheduler=scheduler)
        torch.save(full_weights(chunks), os.path.join(root, "expected_weights.pt"))
        train_step(chunks, optimizer, scheduler, 1)
        real_publish = publish.publish

        def hang_before_publishing(*args, **kwargs):
            open(os.path.join(root, "writing_step_2"), "w").close()
            time.sleep(600)  # killed here
            return real_publish(*args, **kwargs)

        publish.publish = hang_before_publishing
        save_checkpoint(root, TrainState(step=2, consumed_samples=8), chunks, optimizer, scheduler=scheduler)
        raise SystemExit("not killed")
    cfg.checkpoint.load = "auto"
    chunks, optimizer, scheduler = build(cfg, seed=2)
    loaded = resume(cfg, root, chunks, optimizer, scheduler=scheduler)
    expected = torch.load(os.path.join(root, "expected_weights.pt"))
    result = {
        "loaded_from": loaded.path.name,
        "step": loaded.train_state.step,
        "consumed_samples": loaded.train_state.consumed_samples,
        "weights_equal": all(torch.equal(full_weights(chunks)[k], v) for k, v in expected.items()),
        "tmp_before_save": sorted(p for p in os.listdir(root) if p.startswith("tmp.")),
    }
    train_step(chunks, optimizer, scheduler, 1)
    save_checkpoint(root, TrainState(step=2, consumed_samples=8), chunks, optimizer, scheduler=scheduler)
    result["tmp_after_save"] = sorted(p for p in os.listdir(root) if p.startswith("tmp."))
    result["latest_after_save"] = open(os.path.join(root, "latest")).read().strip()
    with open(os.path.join(root, "resume.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
