"""The thought-free stage in a run: the stage section, build_stage, and the loop-shaped objective."""

import pytest
import torch

from quietstar import QuietStarForCausalLM
from quietstar.assets import byte_tokenizer, tiny_random_llama
from quietstar.ntp import distillation_loss, ntp_policy_loss
from quietstar.training.config import ConfigError, RunConfig
from quietstar.training.config_loading import from_dict
from quietstar.training.objectives import StageSettings, build_stage, make_ntp_objective, stage_run_problems


def saved_teacher(folder, seed=0):
    """A tiny thinking model saved as a run's final/ folder would be. Its mixing head's last layer is
    not 0 and large, so thoughts move its prediction away from its base LM's (else the student, a
    copy of that base, would start at KL 0), and its tied embedding is 5x the init scale, so its
    predictions are not near-uniform."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)  # the mixing head and delimiter init draw from the global RNG
    model = QuietStarForCausalLM.from_base(tiny_random_llama(len(tokenizer), seed), tokenizer=tokenizer,
                                           n_thought_tokens=2, n_talk_tokens=2, n_passes=1)
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(seed))
        model.base_lm.lm_head.weight.mul_(5.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def text_batch(B=2, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return saved_teacher(tmp_path_factory.mktemp("teacher"))


# ---------------------------------------------------------------------- the objective


@pytest.mark.parametrize("kind, direct, settings", [
    ("ntp_policy", ntp_policy_loss, dict(reinforce_temperature=2.0, clip_negative_rewards=False, policy_loss_weight=0.5,
                                         nll_weight=0.25)),
    ("distill", distillation_loss, dict(kl_weight=0.75, nll_weight=0.5)),
])
def test_objective_is_the_ntp_loss_with_the_same_generator(teacher_folder, kind, direct, settings):
    """Sampled teacher thoughts (temperature 1) and sampled actions: both sides draw from one seed."""
    stage = StageSettings(kind=kind, teacher=teacher_folder, teacher_thought_temperature=1.0, **settings)
    student, teacher, _, _ = build_stage(stage)
    ids, mask = text_batch()
    objective = make_ntp_objective(kind, teacher, stage, generator=torch.Generator().manual_seed(7))
    loss, terms, output = objective(student, ids, mask)
    expected, expected_terms = direct(teacher, student, ids, mask, generator=torch.Generator().manual_seed(7), **settings)
    # Same functions, same inputs, same draws: equal to fp32 rounding (no second code path).
    torch.testing.assert_close(loss, expected)
    assert terms.keys() == expected_terms.keys() and output is None
    for name, value in terms.items():
        assert value.dim() == 0 and not value.requires_grad
        torch.testing.assert_close(value, expected_terms[name], msg=lambda m: f"{name}: {m}")
    assert loss.requires_grad and loss.item() > 0
    other, _, _ = make_ntp_objective(kind, teacher, stage, generator=torch.Generator().manual_seed(8))(student, ids, mask)
    assert not torch.equal(other, loss)  # the generator is really used (another seed, other draws)


def test_objective_calls_a_wrapped_student(teacher_folder, tmp_path):
    """Under DDP the loop passes the wrapper: it is called as given, and checked unwrapped."""
    import torch.distributed as dist

    student, teacher, _, objective = build_stage(StageSettings(kind="distill", teacher=teacher_folder))
    ids, mask = text_batch()
    plain = objective(student, ids, mask)[0]
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = objective(torch.nn.parallel.DistributedDataParallel(student), ids, mask)[0]
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(wrapped, plain)  # greedy teacher, no sampling: one computation twice


def test_objective_refuses_a_thinking_student(teacher_folder):
    _, teacher, _, objective = build_stage(StageSettings(teacher=teacher_folder))
    with pytest.raises(TypeError, match="plain transformers causal LM"):
        objective(teacher, *text_batch())


def test_distillation_steps_lower_the_kl_and_leave_the_teacher_frozen(teacher_folder):
    student, teacher, tokenizer, objective = build_stage(StageSettings(kind="distill", teacher=teacher_folder))
    assert len(tokenizer) == 259  # the teacher's, delimiters included (export removes them)
    before = {name: p.clone() for name, p in teacher.state_dict().items()}
    ids, mask = text_batch()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    kls = []
    for _ in range(6):
        loss, terms, _ = objective(student, ids, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        kls.append(terms["kl"].item())
    kl_after = objective(student, ids, mask)[1]["kl"].item()
    assert kls[0] > 0.05  # the thoughts made the teacher differ from its base, the student's start
    assert kl_after < 0.5 * kls[0], kls + [kl_after]
    assert not teacher.training and not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name  # bit equality: the teacher is never written


def test_a_teacher_in_train_mode_is_refused(teacher_folder):
    student, teacher, _, _ = build_stage(StageSettings(teacher=teacher_folder))
    teacher.train()
    with pytest.raises(ValueError, match="freeze_teacher"):
        make_ntp_objective("distill", teacher, StageSettings())


# ---------------------------------------------------------------------- build_stage


def test_build_stage_loads_the_teacher_once_with_the_stage_thought_settings():
    calls = []
    tokenizer = byte_tokenizer()

    def load_model(spec, **kwargs):
        calls.append((spec, kwargs))
        base = tiny_random_llama(257, seed=len(calls))
        model = QuietStarForCausalLM.from_base(base, tokenizer=byte_tokenizer(), n_thought_tokens=2, n_talk_tokens=2)
        for key, value in kwargs.get("thought", {}).items():
            setattr(model.config, key, value)
        return model, tokenizer

    settings = StageSettings(kind="ntp_policy", teacher="run/final", student_init="org/base",
                             teacher_thought_temperature=0.5, teacher_n_passes=2)
    student, teacher, tok, objective = build_stage(settings, load_model, dtype=torch.float32)
    assert [spec for spec, _ in calls] == ["run/final", "org/base"]
    assert calls[0][1]["thought"] == {"thought_temperature": 0.5, "n_passes": 2}
    assert teacher.config.n_passes == 2 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert tok is tokenizer
    # The student is the second model's base (seed 2), not a copy of the teacher's (seed 1).
    embedding = student.get_input_embeddings().weight
    assert torch.equal(embedding, tiny_random_llama(257, seed=2).get_input_embeddings().weight)
    assert not torch.equal(embedding, teacher.base_lm.get_input_embeddings().weight)


# ---------------------------------------------------------------------- the stage section


@pytest.mark.parametrize("changes, message", [
    (dict(teacher=None), r"stage.teacher must name the thinking model"),
    (dict(kind="rl"), r"stage.kind must be one of \['ntp_policy', 'distill'\], got 'rl'"),
    (dict(student_init=""), r"stage.student_init must be 'teacher_base' or a base-model spec"),
    (dict(reinforce_temperature=0.0), r"stage.reinforce_temperature must be > 0"),
    (dict(kl_weight=-1.0), r"stage.kl_weight must be >= 0, got -1.0"),
    (dict(policy_loss_weight=0.0), r"stage.policy_loss_weight and stage.nll_weight are both 0: nothing would be trained"),
    (dict(kind="distill", kl_weight=0.0), r"stage.kl_weight and stage.nll_weight are both 0"),
    (dict(teacher_thought_temperature=-0.1), r"stage.teacher_thought_temperature must be >= 0"),
    (dict(teacher_n_passes=0), r"stage.teacher_n_passes must be >= 1, got 0"),
    (dict(teacher_n_passes=2), r"greedy thoughts .* repeats one thought; set stage.teacher_n_passes: 1"),
])
def test_validation_names_the_problem_and_the_fix(changes, message):
    settings = StageSettings(**{"teacher": "run/final", **changes})
    with pytest.raises(ValueError, match=message):
        settings.validate()
    with pytest.raises(ValueError, match=message):
        build_stage(settings, load_model=lambda *a, **k: pytest.fail("loaded a model for invalid settings"))


def test_defaults_are_valid_and_distill_ignores_the_policy_weight():
    assert StageSettings(teacher="run/final").problems() == []
    assert StageSettings(kind="distill", teacher="run/final", policy_loss_weight=0.0).problems() == []
    assert StageSettings(teacher="run/final", teacher_n_passes=2, teacher_thought_temperature=1.0).problems() == []


def test_the_section_reads_from_yaml_data_with_the_run_config_machinery():
    settings = from_dict(StageSettings, {"kind": "distill", "teacher": "runs/a/final", "kl_weight": 2, "nll_weight": "1e-1"},
                         "stage")
    assert settings == StageSettings(kind="distill", teacher="runs/a/final", kl_weight=2.0, nll_weight=0.1)
    with pytest.raises(ConfigError, match=r"unknown config key 'stage.kl_weigth'; did you mean 'kl_weight'"):
        from_dict(StageSettings, {"kl_weigth": 1.0}, "stage")
    with pytest.raises(ConfigError, match=r"stage.kind must be one of"):
        from_dict(StageSettings, {"kind": "sft"}, "stage")


def test_sections_a_stage_run_cannot_use():
    cfg = RunConfig()
    assert stage_run_problems(cfg) == []
    cfg.model.lora = object()
    cfg.thought.schedule = object()  # the field the curriculum adds to the thought section
    problems = stage_run_problems(cfg)
    assert [p.split(";")[1].strip() for p in problems] == ["remove model.lora (LoRA is for thinking runs)",
                                                          "remove thought.schedule (a curriculum is for thinking runs)"]

