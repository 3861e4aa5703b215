"""The CPU compatibility layer: megatron's CUDA-only calls work on a CPU-only torch."""
import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the compat layer applies only without CUDA")


def test_cuda_requests_land_on_cpu(megatron_world_of_one):
    x = torch.zeros(3, device="cuda")
    assert x.device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert x.cuda() is x and x.to("cuda").device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor"  # what megatron's grad clipping asserts
    torch.cuda.current_stream().wait_stream(None)


def test_megatron_rng_tracker_uses_cpu_generator(megatron_world_of_one):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the fork restored the default stream
    with tracker.fork():
        assert not torch.equal(torch.rand(4), inside)  # the tracker's own stream advanced


def test_grad_clipping_runs(megatron_world_of_one):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    norm = get_grad_norm_fp32([p.grad])
    assert norm == pytest.approx(6.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=norm)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
