"""Two gloo processes on CPU against one process with the same global batch: same loss, same gradients."""

import os
import subprocess
import sys

import torch

from gigassl_fast.train import build_model, contrastive_step

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_processes_match_one(tmp_path):
    gen = torch.Generator().manual_seed(3)
    b = 8
    inputs = {"f1": torch.rand(b, 5, 256, generator=gen), "f2": torch.rand(b, 5, 256, generator=gen),
              "l1": torch.randint(0, 6000, (b, 5, 2), generator=gen), "l2": torch.randint(0, 6000, (b, 5, 2), generator=gen)}
    torch.save(inputs, tmp_path / "inputs.pt")
    init = tmp_path / "init"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), str(r), "2", str(init), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dist_res = torch.load(tmp_path / "dist.pt")

    torch.manual_seed(0)
    model = build_model("sparse-layer4", 256).train()
    loss, _ = contrastive_step(model, (inputs["f1"], inputs["l1"]), (inputs["f2"], inputs["l2"]), 0.05)
    assert abs(loss.item() - dist_res["loss"].item()) < 1e-4 * max(1.0, abs(loss.item()))
    for name, p in model.named_parameters():
        g_dist = dist_res["grads"][name]
        assert g_dist is not None, name
        torch.testing.assert_close(g_dist, p.grad, rtol=2e-3, atol=2e-5 * p.grad.abs().max().item() + 1e-8, msg=name)
