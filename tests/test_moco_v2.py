"""MoCo v2 with its queue, and LoGo on it: the InfoNCE against the queue written out from the MoCo paper (values,
gradients, stop-gradient on keys and queue, symmetry), the queue's first-in-first-out order with wrap-around, the
trainer's queue after a step, the constant momentum."""
import torch
import torch.nn.functional as F

from conftest import TINY
from config import load_config
from losses import enqueue, moco_info_nce, multicrop_moco_v2

B, D, K, T = 4, 6, 10, 0.2


def _rand(*shape, seed, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                       requires_grad=grad)


def _nce(q, k, queue):
    """MoCo's Algorithm 1: l_pos = q.k, l_neg = q.queue, logits = [l_pos, l_neg] / T, labels 0 (unit vectors)."""
    total = 0.0
    for b in range(q.shape[0]):
        qb = q[b] / q[b].norm()
        pos = qb @ (k[b] / k[b].norm()).detach()
        neg = torch.stack([qb @ (n / n.norm()).detach() for n in queue])
        logits = torch.cat([pos[None], neg]) / T
        total = total - (logits[0] - torch.logsumexp(logits, 0))
    return total / q.shape[0]


def test_moco_info_nce_is_the_papers_algorithm():
    q, k, queue = _rand(B, D, seed=0), _rand(B, D, seed=1), _rand(K, D, seed=2)
    got, ref = moco_info_nce(q, k, queue, T), _nce(q, k, queue)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, q)[0], torch.autograd.grad(ref, q)[0], rtol=1e-9, atol=1e-12)
    assert torch.autograd.grad(moco_info_nce(q, k, queue, T), [k, queue], allow_unused=True) == (None, None)


def test_symmetrised_moco_v2_and_its_multicrop_pairs():
    q1, q2, k1, k2 = (_rand(B, D, seed=i) for i in range(4))
    queue = _rand(K, D, seed=9, grad=False)
    got = multicrop_moco_v2([q1, q2], [k1, k2], queue, T)
    torch.testing.assert_close(got, (_nce(q1, k2, queue) + _nce(q2, k1, queue)) / 2, rtol=1e-10, atol=0)
    torch.testing.assert_close(multicrop_moco_v2([q2, q1], [k2, k1], queue, T), got)
    q3 = _rand(B, D, seed=5)  # a local view: paired with both global keys
    ref = (_nce(q1, k2, queue) + _nce(q2, k1, queue) + _nce(q3, k1, queue) + _nce(q3, k2, queue)) / 4
    torch.testing.assert_close(multicrop_moco_v2([q1, q2, q3], [k1, k2], queue, T), ref, rtol=1e-10, atol=0)


def test_the_queue_is_first_in_first_out_with_wrap_around():
    queue, ptr = torch.zeros(K, D), torch.zeros((), dtype=torch.long)
    expected = [None] * K
    p = 0
    for step in range(5):  # 5 x 3 keys into 10 rows: wraps once
        keys = torch.randn(3, D) * (step + 1)
        enqueue(queue, ptr, keys)
        for row in F.normalize(keys, dim=1):
            expected[p % K] = row
            p += 1
        assert int(ptr) == p % K
    torch.testing.assert_close(queue, torch.stack(expected))
    # the newest keys replaced the oldest: rows 0..4 hold steps 3 and 4's keys
    assert torch.allclose(queue.norm(dim=1), torch.ones(K))


def test_the_trainers_step_enqueues_its_keys_and_keeps_the_momentum_constant():
    import train_coss
    cfg = load_config(None, TINY + ["--method.name=moco_v2", "--moco.queue_size=40", "--optim.tau=0.999",
                                    "--optim.tau_schedule=constant"])
    torch.manual_seed(0)
    run = train_coss.build_run(cfg, torch.device("cpu"), num_classes=10)
    queue0 = run.state[0].clone()
    assert torch.allclose(queue0.norm(dim=1), torch.ones(40))  # random unit keys at first
    batch = (torch.randint(0, 256, (16, 2, 16, 16, 3), dtype=torch.uint8), torch.randint(0, 10, (16, 1)))
    views = run.make_views(batch, 16, run.generator(0))[0]
    with torch.no_grad():
        keys = [run.target(v) for v in views]                           # the keys the step will compute
    run.step(batch)
    torch.testing.assert_close(run.state[0][:32], F.normalize(torch.cat(keys), dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.state[0][32:], queue0[32:])
    assert int(run.state[1]) == 32
    assert run.tau(0) == run.tau(run.total_steps // 2) == 0.999

