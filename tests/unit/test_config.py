"""linscale.config: strict TOML loading, overrides, coercion, precedence, validation, TOML output."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass

import pytest

from linscale import config as lc
from linscale.config import ConfigError, load_config, parse_overrides, to_dict, to_toml

# A stop condition, so that configs built only to test one thing pass validation.
STOP = {"train": {"max_steps": 5}}


@dataclass(kw_only=True)
class ToyTaskConfig:
    width: int = 8
    scale: float = 0.5
    name: str = "toy"
    flag: bool = False
    tag: str | None = None


def write(tmp_path, text: str, name: str = "run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- strict TOML loading -------------------------------------------------------------------


def test_toml_values_reach_their_sections(tmp_path):
    path = write(
        tmp_path,
        '[train]\nmax_steps = 7\nglobal_batch = 12\n[optim]\nlr = 0.01\nschedule = "constant"\n'
        "[log]\nprogress = false\n",
    )
    cfg = load_config(path, {}, None)
    assert cfg.train.max_steps == 7
    assert cfg.train.global_batch == 12
    assert cfg.optim.lr == 0.01
    assert cfg.optim.schedule == "constant"
    assert cfg.log.progress is False
    assert cfg.task is None


def test_unknown_section_names_nearest_section(tmp_path):
    path = write(tmp_path, "[trian]\nmax_steps = 5\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'.*did you mean 'train'"):
        load_config(path, {}, None)


def test_unknown_key_names_nearest_key(tmp_path):
    path = write(tmp_path, "[train]\nmax_step = 5\n")
    with pytest.raises(ConfigError, match=r"unknown key in \[train\] 'max_step'.*did you mean 'max_steps'"):
        load_config(path, {}, None)


def test_unknown_key_without_near_match_lists_known_keys(tmp_path):
    path = write(tmp_path, "[parallel]\nzzzzzzzz = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, STOP, None)
    msg = str(err.value)
    assert "zzzzzzzz" in msg
    for f in dataclasses.fields(lc.ParallelConfig):
        assert f.name in msg


def test_unknown_key_in_override_is_rejected_too():
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config(None, {**STOP, "optim": {"lrr": "1e-3"}}, None)


def test_section_that_is_not_a_table(tmp_path):
    path = write(tmp_path, "train = 5\n")
    with pytest.raises(ConfigError, match=r"\[train\] must be a table"):
        load_config(path, {}, None)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(missing, STOP, None)
    assert str(missing) in str(err.value)


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[train\nmax_steps = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_config(path, STOP, None)
    assert str(path) in str(err.value)


# --- override parsing ------------------------------------------------------------------------


def test_parse_overrides_both_forms_and_dashes():
    out = parse_overrides(
        ["--train.max_steps=5", "--optim.lr", "1e-3", "--train.global-batch=64", "--log.dir=a=b", "--task.x", "-1"]
    )
    assert out == {
        "train": {"max_steps": "5", "global_batch": "64"},
        "optim": {"lr": "1e-3"},
        "log": {"dir": "a=b"},
        "task": {"x": "-1"},
    }


def test_parse_overrides_last_one_wins():
    assert parse_overrides(["--train.seed=1", "--train.seed", "2"]) == {"train": {"seed": "2"}}


@pytest.mark.parametrize("arg", ["train.max_steps=5", "--max_steps=5", "-t", "positional"])
def test_parse_overrides_rejects_non_override(arg):
    with pytest.raises(ConfigError, match="--section.field=value") as err:
        parse_overrides([arg])
    assert repr(arg) in str(err.value)


def test_parse_overrides_missing_value():
    with pytest.raises(ConfigError, match=r"--optim\.lr needs a value"):
        parse_overrides(["--train.max_steps=3", "--optim.lr"])


def test_overrides_are_coerced_into_config():
    cfg = load_config(None, parse_overrides(["--train.max_steps", "12", "--optim.lr=2e-3", "--log.progress=no"]), None)
    assert cfg.train.max_steps == 12 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 2e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.log.progress is False


# --- type coercion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "field", "expected"),
    [
        ("--train.max_steps=abc", "train.max_steps", "integer"),
        ("--train.max_steps=2.5", "train.max_steps", "integer"),
        ("--train.max_steps=true", "train.max_steps", "integer"),
        ("--optim.lr=fast", "optim.lr", "number"),
        ("--log.progress=maybe", "log.progress", "true or false"),
    ],
)
def test_coercion_error_names_field_and_type(arg, field, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, {**STOP, **parse_overrides([arg])}, None)
    msg = str(err.value)
    assert field in msg
    assert expected in msg
    assert repr(arg.split("=", 1)[1]) in msg


def test_toml_types_are_checked_strictly(tmp_path):
    with pytest.raises(ConfigError, match="train.seed expects an integer"):
        load_config(write(tmp_path, "[train]\nmax_steps = 3\nseed = true\n"), {}, None)
    with pytest.raises(ConfigError, match="log.progress expects true or false"):
        load_config(write(tmp_path, "[train]\nmax_steps = 3\n[log]\nprogress = 1\n"), {}, None)


@pytest.mark.parametrize(("text", "value"), [("1_000", 1000), ("1e3", 1000), ("4.0", 4), (" 12 ", 12)])
def test_integer_spellings(text, value):
    cfg = load_config(None, {"train": {"max_steps": text}}, None)
    assert cfg.train.max_steps == value
    assert type(cfg.train.max_steps) is int


@pytest.mark.parametrize("text", ["inf", "1e400"])
def test_integer_field_rejects_infinity_with_config_error(text):
    with pytest.raises(ConfigError, match="train.max_steps expects an integer"):
        load_config(None, {"train": {"max_steps": text}}, None)


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", "on", "ON"])
def test_bool_true_spellings(text):
    cfg = load_config(None, {**STOP, "log": {"tensorboard": text}, "parallel": {"gradient_as_bucket_view": text}}, None)
    assert cfg.log.tensorboard is True
    assert cfg.parallel.gradient_as_bucket_view is True


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "off", "OFF"])
def test_bool_false_spellings(text):
    cfg = load_config(None, {**STOP, "log": {"tensorboard": text}, "parallel": {"gradient_as_bucket_view": text}}, None)
    assert cfg.log.tensorboard is False
    assert cfg.parallel.gradient_as_bucket_view is False


def test_optional_field_accepts_none():
    cfg = load_config(None, {**STOP, "task": {"tag": "none"}}, ToyTaskConfig)
    assert cfg.task.tag is None
    cfg = load_config(None, {**STOP, "task": {"tag": "abc", "width": "3", "flag": "on"}}, ToyTaskConfig)
    assert cfg.task == ToyTaskConfig(tag="abc", width=3, flag=True)


# --- precedence ------------------------------------------------------------------------------


def test_precedence_defaults_then_file_then_overrides(tmp_path):
    defaults = {"train": {"max_steps": 10, "seed": 1, "log_every": 3}, "optim": {"lr": 0.5}, "task": {"width": 2}}
    path = write(tmp_path, '[train]\nmax_steps = 20\nseed = 2\n[task]\nwidth = 4\nname = "file"\n')
    overrides = parse_overrides(["--train.seed=3", "--task.name=cli"])
    cfg = load_config(path, overrides, ToyTaskConfig, defaults)
    assert cfg.train.max_steps == 20  # file beats task default
    assert cfg.train.seed == 3  # override beats file
    assert cfg.train.log_every == 3  # task default kept where nothing else set it
    assert cfg.optim.lr == 0.5
    assert cfg.train.eval_every == lc.TrainConfig.__dataclass_fields__["eval_every"].default
    assert cfg.task == ToyTaskConfig(width=4, name="cli")


def test_defaults_are_not_mutated(tmp_path):
    defaults = {"train": {"max_steps": 10}}
    load_config(write(tmp_path, "[train]\nmax_steps = 20\n"), {"train": {"seed": "9"}}, None, defaults)
    assert defaults == {"train": {"max_steps": 10}}


# --- [task] ----------------------------------------------------------------------------------


def test_task_settings_rejected_for_task_without_config(tmp_path):
    with pytest.raises(ConfigError, match="takes no \\[task\\] settings") as err:
        load_config(None, {**STOP, "task": {"width": "3", "alpha": "1"}}, None)
    assert "alpha, width" in str(err.value)
    with pytest.raises(ConfigError, match="takes no \\[task\\] settings"):
        load_config(write(tmp_path, "[train]\nmax_steps = 1\n[task]\nwidth = 3\n"), {}, None)


def test_task_config_unknown_key():
    with pytest.raises(ConfigError, match=r"unknown key in \[task\] 'widht'.*did you mean 'width'"):
        load_config(None, {**STOP, "task": {"widht": "3"}}, ToyTaskConfig)


def test_task_config_defaults_when_no_task_section():
    assert load_config(None, STOP, ToyTaskConfig).task == ToyTaskConfig()


# --- validation ------------------------------------------------------------------------------


def test_no_stop_condition():
    with pytest.raises(ConfigError, match="no stop condition"):
        load_config(None, {}, None)


@pytest.mark.parametrize("stop", [{"max_steps": "1"}, {"max_tokens": "100"}, {"max_time": "0.5"}])
def test_any_stop_condition_is_enough(stop):
    load_config(None, {"train": stop}, None)


@pytest.mark.parametrize(
    ("section", "key", "value", "choices"),
    [
        ("optim", "schedule", "linear", ["cosine", "constant"]),
        ("optim", "impl", "magic", ["auto", "fused", "foreach"]),
        ("runtime", "device", "tpu", ["auto", "cpu", "cuda"]),
        ("runtime", "precision", "fp8", ["auto", "fp32", "bf16-mixed"]),
        ("parallel", "strategy", "fsdp2", ["ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp", "auto"]),
    ],
)
def test_bad_choice_lists_valid_choices(section, key, value, choices):
    with pytest.raises(ConfigError) as err:
        load_config(None, {**STOP, section: {key: value}}, None)
    msg = str(err.value)
    assert f"{section}.{key}" in msg and repr(value) in msg
    for c in choices:
        assert c in msg


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("train", {"global_batch": "-1"}, "train.global_batch"),
        ("train", {"micro_batch": "-2"}, "train.micro_batch"),
        ("train", {"max_time": "-1"}, "train.max_time"),
        ("train", {"log_every": "0"}, "train.log_every"),
        ("train", {"global_batch": "0"}, "train.global_batch"),
        ("optim", {"lr": "0"}, "optim.lr"),
        ("optim", {"warmup_steps": "-1"}, "optim.warmup_steps"),
        ("optim", {"min_lr_ratio": "1.5"}, "optim.min_lr_ratio"),
        ("parallel", {"bucket_mb": "0"}, "parallel.bucket_mb"),
        ("runtime", {"timeout": "0"}, "runtime.timeout"),
    ],
)
def test_out_of_range_values(section, values, field):
    merged = {"train": {"max_steps": "5"}}
    merged.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, merged, None)


def test_global_batch_zero_allowed_with_token_batch():
    cfg = load_config(None, {"train": {"max_steps": "5", "global_batch": "0", "global_batch_tokens": "4096"}}, None)
    assert cfg.train.global_batch_tokens == 4096


# --- TOML output -----------------------------------------------------------------------------


def test_to_toml_round_trips_resolved_config(tmp_path):
    cfg = load_config(
        None,
        parse_overrides(
            [
                "--train.max_steps=7",
                "--optim.lr=3e-4",
                '--log.dir=runs/a "quoted" \\ dir',
                "--task.scale=1e-12",
                "--task.flag=yes",
            ]
        ),
        ToyTaskConfig,
    )
    data = to_dict(cfg)
    assert set(data) == {*lc.SECTIONS, "task"}
    text = to_toml(data)
    parsed = tomllib.loads(text)
    # tag=None is left out of the file; everything else comes back equal and of the same type.
    expected = {s: {k: v for k, v in vals.items() if v is not None} for s, vals in data.items()}
    assert parsed == expected
    for section, values in expected.items():
        for key, value in values.items():
            assert type(parsed[section][key]) is type(value), (section, key)
    # ... and the file loads back into the same configuration.
    path = write(tmp_path, text)
    assert load_config(path, {}, ToyTaskConfig) == cfg


def test_to_toml_round_trips_gpt_task_config():
    from linscale.tasks.gpt import GPTTask

    cfg = load_config(None, {}, GPTTask.Config, GPTTask.defaults)
    data = to_dict(cfg)
    assert tomllib.loads(to_toml(data)) == data


def test_to_toml_round_trips_strings_with_newlines():
    data = {"task": {"prompt": "def f():\n    return 1\n"}}
    assert tomllib.loads(to_toml(data)) == data


def test_micro_batch_takes_a_number_or_auto():
    from linscale.config import load_config

    assert load_config(None, {"train": {"micro_batch": "auto", "max_steps": "1"}}, None).train.micro_batch == "auto"
    assert load_config(None, {"train": {"micro_batch": "4", "max_steps": "1"}}, None).train.micro_batch == 4
    with pytest.raises(ConfigError, match="integer >= 0 or auto"):
        load_config(None, {"train": {"micro_batch": "big", "max_steps": "1"}}, None)
    with pytest.raises(ConfigError, match="lr_scaling"):
        load_config(None, {"optim": {"lr_scaling": "cubic"}, "train": {"max_steps": "1"}}, None)
