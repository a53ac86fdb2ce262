"""The thought-free stage's objectives: hand computations, the frozen teacher, learning."""

import math

import pytest
import torch
from tiny_models import padded_batch, tiny_base

from quietstar import QuietStarForCausalLM
from quietstar.assets import byte_tokenizer, tiny_random_llama
from quietstar.ntp import (
    distillation_loss,
    distillation_loss_from_logits,
    forward_student,
    freeze_teacher,
    make_student,
    ntp_policy_loss,
    ntp_policy_loss_from_logits,
    teacher_log_probs,
)

# fp32 log-softmax over a few values of magnitude <= ~10 against a float64 loop: a few ulps of 10.
RTOL, ATOL = 1e-5, 1e-5


def thinking_teacher(seed=0, **thought):
    """A tiny teacher whose thoughts change its prediction: the mixing head's last layer is not 0, and
    weights 5x the default init scale, else a random tiny model's thoughts barely move its near-uniform output."""
    base = tiny_base("llama", seed=seed, initializer_range=0.1, attention_dropout=thought.pop("attention_dropout", 0.0))
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=2, n_talk_tokens=2, **{"n_passes": 1, **thought})
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(seed))
    return freeze_teacher(model)


def random_batch(B=2, L=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    student_logits = 3 * torch.randn(B, L, V, generator=g)
    teacher_lp = torch.log_softmax(3 * torch.randn(B, L, V, generator=g), -1)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[1, 4] = -100
    actions = torch.randint(0, V, (B, L), generator=g)
    return student_logits, teacher_lp, mask, labels, actions


def log_softmax_at(row, index, temperature=1.0):
    scaled = [x / temperature for x in row]
    return scaled[index] - math.log(sum(math.exp(x) for x in scaled))


def has_target(mask, labels, b, i):
    L = len(mask[b])
    return i + 1 < L and mask[b][i] and mask[b][i + 1] and labels[b][i + 1] != -100


@pytest.mark.parametrize("clip", [True, False])
def test_policy_loss_matches_hand_computation(clip):
    student_logits, teacher_lp, mask, labels, actions = random_batch()
    T, w_policy, w_nll = 3.0, 0.7, 0.3
    loss, terms = ntp_policy_loss_from_logits(student_logits, teacher_lp, mask, labels, actions=actions,
                                              reinforce_temperature=T, clip_negative_rewards=clip,
                                              policy_loss_weight=w_policy, nll_weight=w_nll)
    z, t, m, y, a = (x.double().tolist() if x.is_floating_point() else x.tolist()
                     for x in (student_logits, teacher_lp, mask, labels, actions))
    policy = nll = rewarded = 0.0
    n = 0
    for b in range(len(z)):
        for i in range(len(z[b])):
            if not has_target(m, y, b, i):
                continue
            target = y[b][i + 1]
            student_lp = log_softmax_at(z[b][i], target)
            reward = student_lp - t[b][i][target]  # log p_student - log p_teacher of the true next token
            advantage = max(reward, 0.0) if clip else reward
            policy -= advantage * log_softmax_at(z[b][i], a[b][i], T)
            nll -= student_lp
            rewarded += advantage > 0
            n += 1
    policy, nll = policy / n, nll / n
    assert terms["positions"].item() == n == 9  # row 0: i = 2..5 (left padding); row 1: i = 0..5 but 3 (label -100)
    torch.testing.assert_close(terms["policy_loss"].double(), torch.tensor(policy, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(terms["nll"].double(), torch.tensor(nll, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss.double(), torch.tensor(w_policy * policy + w_nll * nll, dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)
    assert 0 < terms["advantage_positive_fraction"].item() < 1
    assert math.isclose(terms["advantage_positive_fraction"].item(), rewarded / n, rel_tol=1e-6)


def test_distillation_matches_hand_computation():
    student_logits, teacher_lp, mask, labels, _ = random_batch(seed=1)
    loss, terms = distillation_loss_from_logits(student_logits, teacher_lp, mask, labels, kl_weight=0.8, nll_weight=0.4)
    z, t, m, y = (x.double().tolist() if x.is_floating_point() else x.tolist() for x in (student_logits, teacher_lp, mask, labels))
    kl = nll = 0.0
    n_kl = n_nll = 0
    for b in range(len(z)):
        for i in range(len(z[b])):
            if not m[b][i]:
                continue
            kl += sum(math.exp(t[b][i][v]) * (t[b][i][v] - log_softmax_at(z[b][i], v)) for v in range(len(z[b][i])))
            n_kl += 1
            if has_target(m, y, b, i):
                nll -= log_softmax_at(z[b][i], y[b][i + 1])
                n_nll += 1
    kl, nll = kl / n_kl, nll / n_nll
    assert n_kl == 12 and n_nll == 9
    torch.testing.assert_close(terms["kl"].double(), torch.tensor(kl, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(terms["nll"].double(), torch.tensor(nll, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss.double(), torch.tensor(0.8 * kl + 0.4 * nll, dtype=torch.float64), rtol=RTOL, atol=ATOL)


def test_policy_gradient_is_reinforce_on_sampled_tokens_only_where_the_student_wins():
    student_logits, teacher_lp, mask, labels, actions = random_batch(seed=2)
    student_logits.requires_grad_(True)
    T = 3.0
    loss, terms = ntp_policy_loss_from_logits(student_logits, teacher_lp, mask, labels, actions=actions, reinforce_temperature=T)
    loss.backward()
    n = terms["positions"].item()
    for b in range(student_logits.shape[0]):
        for i in range(student_logits.shape[1]):
            grad = student_logits.grad[b, i]
            reward = 0.0
            if has_target(mask.tolist(), labels.tolist(), b, i):
                target = labels[b, i + 1]
                reward = (torch.log_softmax(student_logits[b, i].detach(), -1)[target] - teacher_lp[b, i, target]).item()
            if reward <= 0:  # no target, or the teacher predicts the true token better: no gradient at all
                assert torch.equal(grad, torch.zeros_like(grad))  # exact: the advantage is a multiplied 0
                continue
            q = torch.softmax(student_logits[b, i].detach() / T, -1)
            expected = reward / n * (q - torch.nn.functional.one_hot(actions[b, i], q.numel())) / T
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_actions_are_sampled_from_the_student_and_sharpen_it_in_expectation():
    """Mean gradient over many sampled actions = adv (softmax(z/T) - softmax(z)) / T: a sharpening step."""
    V, n, T = 6, 20000, 3.0
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    logits = z.expand(1, n + 1, V).clone().requires_grad_(True)
    labels = torch.zeros(1, n + 1, dtype=torch.long)  # the student's favourite is the true token ...
    teacher_lp = torch.full((1, n + 1, V), math.log(1 / V))  # ... which the teacher finds less likely: reward > 0
    loss, terms = ntp_policy_loss_from_logits(logits, teacher_lp, torch.ones_like(labels), labels,
                                              generator=torch.Generator().manual_seed(0), reinforce_temperature=T)
    loss.backward()
    reward = (torch.log_softmax(z, -1)[0] - math.log(1 / V)).item()
    p, q = torch.softmax(z, -1), torch.softmax(z / T, -1)
    mean_grad = logits.grad[0].sum(0)  # = reward / T * (q - empirical frequency of the sampled tokens)
    # Each frequency is a mean of n Bernoulli(p_v): 5 standard deviations, scaled by reward / T.
    bound = 5 * (p * (1 - p) / n).sqrt() * reward / T
    assert (mean_grad - reward / T * (q - p)).abs().le(bound).all()
    step = torch.softmax(z - 1.0 * reward / T * (q - p), -1)
    entropy = lambda probs: -(probs * probs.log()).sum()  # noqa: E731
    assert entropy(step) < entropy(p)
    assert terms["advantage_positive_fraction"].item() == 1.0


def test_teacher_log_probs_average_the_passes_of_the_mixed_prediction():
    teacher = thinking_teacher(n_passes=2)
    ids, mask = padded_batch(2, 8, "left")
    lp = teacher_log_probs(teacher, ids, mask, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = teacher(ids, attention_mask=mask, generator=torch.Generator().manual_seed(3)).logits.double()
    probs = torch.softmax(logits, -1).view(2, 2, 8, -1)  # passes adjacent
    expected = ((probs[:, 0] + probs[:, 1]) / 2).log()
    assert not torch.allclose(probs[:, 0], probs[:, 1], atol=1e-3)  # the two thoughts differ
    torch.testing.assert_close(lp.double(), expected, rtol=RTOL, atol=ATOL)
    assert not lp.requires_grad


def test_teacher_log_probs_leave_out_the_delimiters_the_head_could_emit():
    tokenizer = byte_tokenizer()  # 257 ids; the delimiters get 257 and 258, rows inside a 300-row table
    base = tiny_random_llama(300, seed=0)
    teacher = freeze_teacher(QuietStarForCausalLM.from_base(base, tokenizer=tokenizer, n_thought_tokens=2,
                                                            n_talk_tokens=2, n_passes=1))
    assert teacher.banned_token_ids == (257, 258)
    ids, mask = padded_batch(2, 6, "right")
    lp = teacher_log_probs(teacher, ids, mask, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = teacher(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0)).logits.double()
    keep = [v for v in range(300) if v not in (257, 258)]
    torch.testing.assert_close(lp[..., keep].double(), torch.log_softmax(logits[..., keep], -1), rtol=RTOL, atol=ATOL)
    assert lp[..., [257, 258]].exp().max() == 0


def test_teacher_stays_frozen_while_the_student_trains():
    teacher = thinking_teacher(attention_dropout=0.5, thought_temperature=0.0)
    before = {name: p.detach().clone() for name, p in teacher.state_dict().items()}
    student = make_student(teacher).train()
    student_before = student.get_output_embeddings().weight.detach().clone()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids, mask = padded_batch(2, 8, "right")
    g = torch.Generator().manual_seed(0)
    first = teacher_log_probs(teacher, ids, mask)
    for loss_fn in (ntp_policy_loss, distillation_loss, ntp_policy_loss):
        loss, _ = loss_fn(teacher, student, ids, mask, generator=g)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # Exact: nothing may write to the teacher; the same forward twice with greedy thoughts and no dropout.
    assert all(torch.equal(p, before[name]) for name, p in teacher.state_dict().items())
    assert torch.equal(teacher_log_probs(teacher, ids, mask), first)
    assert not torch.equal(student.get_output_embeddings().weight, student_before)  # the student did move
    teacher.train()
    with pytest.raises(ValueError, match="freeze_teacher"):
        distillation_loss(teacher, student, ids, mask)


def test_distillation_lowers_the_students_kl_to_the_teacher():
    teacher = thinking_teacher(thought_temperature=0.0)  # greedy thoughts: a fixed target
    torch.manual_seed(0)
    student = make_student(teacher).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    ids, mask = padded_batch(4, 12, "left", seed=1)
    target = teacher_log_probs(teacher, ids, mask)  # computed once, as a loop caching teacher outputs does
    kls = []
    for _ in range(8):
        loss, terms = distillation_loss_from_logits(forward_student(student, ids, mask), target, mask)
        kls.append(terms["kl"].item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert kls[0] > 0.05  # thoughts make the teacher differ from its own base model
    assert kls[-1] < 0.5 * kls[0], kls


def test_bad_inputs_are_refused():
    teacher = thinking_teacher()
    ids, mask = padded_batch(1, 6, "right")
    with pytest.raises(TypeError, match="make_student"):
        distillation_loss(teacher, teacher, ids, mask)
    with pytest.raises(TypeError, match="QuietStarForCausalLM"):
        freeze_teacher(tiny_base("llama"))
    student_logits, teacher_lp, mask, labels, _ = random_batch()
    with pytest.raises(ValueError, match=r"\[B, L, V\]"):
        distillation_loss_from_logits(student_logits, teacher_lp[..., :-1], mask, labels)
    with pytest.raises(ValueError, match="reinforce_temperature"):
        ntp_policy_loss_from_logits(student_logits, teacher_lp, mask, labels, reinforce_temperature=0)
