import pytest

from r1lab.config import ConfigError, ModelConfig, apply_overrides, model_config_from_dict, model_preset, to_dict
from r1lab.recipe import Recipe, load_recipe, save_recipe


def write(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_recipe_table_overrides_preset(tmp_path):
    recipe = load_recipe(write(tmp_path, 'preset = "small"\n[model]\nn_layers = 3\nscore_func = "softmax"\n'))
    assert recipe.preset == "small"
    assert recipe.model.n_layers == 3
    assert recipe.model.score_func == "softmax"
    assert recipe.model.dim == model_preset("small").dim


def test_command_line_overrides_are_typed(tmp_path):
    recipe = load_recipe(write(tmp_path, "[model]\ndim = 96\n"),
                         ["--model.n_heads=2", "--model.route_scale=2.5", "--model.attn_impl=naive"])
    assert recipe.model.dim == 96 and recipe.model.n_heads == 2
    assert recipe.model.route_scale == 2.5 and isinstance(recipe.model.route_scale, float)
    assert recipe.model.attn_impl == "naive"


@pytest.mark.parametrize("text, message", [
    ("[model]\ndimm = 3\n", "unknown key 'model.dimm'"),
    ('[model]\ndim = "wide"\n', "model.dim must be an int, got str 'wide'"),
    ("[model]\nroute_scale = true\n", "model.route_scale must be a float"),
    ('[model]\nscore_func = "relu"\n', "model.score_func must be one of 'softmax', 'sigmoid'"),
    ("[model]\nn_activated_experts = 9\n", "model.n_activated_experts must be in 1..n_routed_experts (8), got 9"),
    ("[model]\nn_expert_groups = 3\n", "model.n_expert_groups (3) must divide model.n_routed_experts (8)"),
    ("[model]\nqk_rope_head_dim = 7\n", "qk_rope_head_dim must be even"),
    ('preset = "huge"\n', "unknown preset 'huge'"),
    ("typo = 1\n", "unknown key 'typo'"),
    ("[model\n", "not valid TOML"),
])
def test_bad_recipes_give_one_line_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("--model.dim=abc", "model.dim must be an int, got 'abc'"),
    ("--model.nope=1", "unknown key 'model.nope'"),
    ("--model", "must look like --section.field=value"),
    ("--model=3", "is a section"),
    ("--model.n_layers=0", "model.n_layers must be > 0"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(None, [override])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_model_config_dict_round_trip():
    cfg = model_preset("v3")
    assert model_config_from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key 'model.wat'"):
        model_config_from_dict({**to_dict(cfg), "wat": 1})


def test_apply_overrides_returns_a_validated_copy():
    cfg = ModelConfig()
    recipe = apply_overrides(Recipe(model=cfg), ["--model.n_layers=2", "model.n_dense_layers=2"])
    assert recipe.model.n_layers == 2 and cfg.n_layers == 4
    with pytest.raises(ConfigError, match="n_dense_layers"):
        apply_overrides(Recipe(model=cfg), ["--model.n_dense_layers=9"])


def test_training_sections_typed_and_validated(tmp_path):
    recipe = load_recipe(write(tmp_path, '[grpo]\nloss = "dapo"\neps_high = 0.28\n[grpo.reward_weights]\naccuracy = 1.0\n'
                                          '[data.task_options]\nops = ["+"]\n'),
                         ["--grpo.optim.lr=5e-5", "--pretrain.steps=7"])
    assert recipe.grpo.loss == "dapo" and recipe.grpo.eps_high == 0.28
    assert recipe.grpo.reward_weights == {"accuracy": 1.0}
    assert recipe.data.task_options == {"ops": ["+"]}
    assert recipe.grpo.optim.lr == 5e-5 and recipe.pretrain.steps == 7
    with pytest.raises(ConfigError, match="grpo.reward_weights.accuracy must be a float"):
        load_recipe(write(tmp_path, '[grpo.reward_weights]\naccuracy = "high"\n'))
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_recipe(None, ["--grpo.group_size=1"])
    with pytest.raises(ConfigError, match="grpo.loss must be one of"):
        load_recipe(None, ["--grpo.loss=ppo"])


def test_saved_recipe_reloads_identically(tmp_path):
    recipe = load_recipe(None, ["--data.task_options={ops = [\"+\", \"-\"]}", "--grpo.beta=0.001"])
    save_recipe(recipe, tmp_path / "resolved.toml")
    assert load_recipe(tmp_path / "resolved.toml") == recipe


@pytest.mark.parametrize("override, message", [
    ("--pretrain.steps=0", "pretrain.steps must be >= 1, got 0"),
    ("--control.save_every=-1", "control.save_every must be >= 0, got -1"),
    ("--sft.optim.min_lr_ratio=2", "sft.optim.min_lr_ratio must be in [0, 1], got 2.0"),
    ("--grpo.optim.beta2=1", "grpo.optim.beta2 must be in [0, 1), got 1.0"),
    ("--grpo.log_every=0", "grpo.log_every must be >= 1, got 0"),
    ("--grpo.reward_weights={format = 1.0, lenght = 1.0}", "grpo.reward_weights: unknown reward 'lenght'"),
    ("--data.task=Arithmetic", "data.task: unknown task family 'Arithmetic'"),
    ("--data.vocab_size=100", "data.vocab_size must be >= 300, got 100"),
])
def test_each_section_names_itself_in_its_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, [override])
    assert str(err.value).startswith(message), str(err.value)


def test_task_options_are_checked_against_the_family():
    assert load_recipe(None, ["--data.task=countdown", "--data.difficulty=4"]).data.difficulty == 4
    with pytest.raises(ConfigError, match=r"data.difficulty must be in 1..4 for task 'countdown', got 5"):
        load_recipe(None, ["--data.task=countdown", "--data.difficulty=5"])
    with pytest.raises(ConfigError, match="takes no option 'kind'"):
        load_recipe(None, ["--data.task=sorting", "--data.slip_options={kind = \"carry\"}"])
    assert load_recipe(None, ["--data.slip_options={kind = \"carry\"}"]).data.slip_options == {"kind": "carry"}
