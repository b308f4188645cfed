import dataclasses

import pytest

from ptd.config import ConfigError, RunConfig, dump_yaml, load_config, to_dict


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.distill.alpha == 0.95 and cfg.distill.temperature == 10.0
    assert cfg.prune.rate == 0.2 and cfg.prune.strategy == "imp"
    assert cfg.teacher.optim.nesterov and cfg.teacher.optim.momentum == 0.9
    assert cfg.teacher.optim.milestones == (60, 120, 160) and cfg.teacher.optim.gamma == 0.2
    # each retraining round hands on its last epoch's weights, as the published code's
    # pruning/lr_rewinding.py (its train loop reloads the best-validation weights after pre-training only)
    assert cfg.prune.retrain_checkpoint == "last"


def test_retrain_checkpoint_survives_a_partial_retrain_section(tmp_path):
    """Every shipped config spells prune.retrain out, which rebuilds OptimConfig from its class
    defaults: the key lives on PruneConfig, so that cannot drop it to the teacher's "best"."""
    assert load_config(write(tmp_path, "prune: {retrain: {epochs: 2}}")).prune.retrain_checkpoint == "last"
    assert load_config(None, ["prune.retrain_checkpoint=best"]).prune.retrain_checkpoint == "best"


def test_yaml_then_cli_precedence(tmp_path):
    p = write(tmp_path, "distill: {alpha: 0.5, temperature: 4}\nprune: {target_sparsity: 0.79}\n")
    cfg = load_config(p, ["distill.alpha=0.7", "teacher.model.arch=vgg19"])
    assert cfg.distill.alpha == 0.7  # CLI beats YAML
    assert cfg.distill.temperature == 4.0  # YAML beats defaults
    assert cfg.prune.target_sparsity == 0.79
    assert cfg.teacher.model.arch == "vgg19"
    assert cfg.name == "c"  # the file's stem names the run


def test_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_roundtrip_through_yaml(tmp_path):
    cfg = load_config(None, ["distill.seeds=[3, 4, 5]", "student.source=named", "student.model={arch: vgg11, width: 0.5}"])
    p = write(tmp_path, dump_yaml(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("text, words", [
    ("distill: {alpah: 0.9}", ["distill.alpah", "unknown key", "alpha", "temperature"]),
    ("bogus: 1", ["bogus", "unknown key", "distill"]),
    ("distill: {alpha: high}", ["distill.alpha", "expected a number"]),
    ("teacher: {optim: {epochs: 2.5}}", ["teacher.optim.epochs", "integer"]),
    ("channels_last: 1", ["channels_last", "true or false"]),
    ("prune: {target_sparsity: 1.0}", ["prune.target_sparsity", "[0, 1)"]),
    ("prune: {target_sparsity: -0.1}", ["prune.target_sparsity"]),
    ("prune: {retrain_checkpoint: final}", ["prune.retrain_checkpoint", "last, best", "published code"]),
    ("distill: {arms: [scratch, teacherless]}", ["distill.arms", "pruned_teacher"]),
    ("student: {source: named}", ["student.model", "required"]),
    ("teacher: {optim: {milestones: [5, 2]}}", ["milestones", "increasing"]),
    # MultiStepLR decays once per listed epoch: [1, 1] was gamma squared at epoch 1 (bad-input audit)
    ("distill: {optim: {milestones: [1, 1]}}", ["distill.optim.milestones", "each once"]),
    ("prune: {retrain: {milestones: [2, 3, 3]}}", ["prune.retrain.milestones", "each once"]),
    ("data: {val_fraction: 1.5}", ["data.val_fraction"]),
    ("distill: [1, 2]", ["distill", "mapping"]),
    ("distill: {alpha: 0.9", ["not valid YAML", "line"]),
])
def test_bad_configs_name_key_and_fix(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    assert "c.yaml" in msg  # where the bad value came from


@pytest.mark.parametrize("text, words", [
    ("prune: {strategy: magic}", ["prune.strategy", "magic", "imp"]),
    ("sweep: {strategies: [imp, magic]}", ["sweep.strategies", "magic", "gmp"]),
    ("distill: {loss: fancy}", ["distill.loss", "fancy", "kd"]),
    ("distill: {loss: [kd, fancy]}", ["distill.loss", "fancy", "kd"]),
    ("distill: {loss: [kd, at], options: {at: {teacher_layers: [features.99]}}}",
     ["distill.options.at", "'features.99'", "not a module of the teacher", "nearest: features.9"]),
    # at's default layers are ptd's ResNet stage names: on a VGG the line names the key the user never set
    ("distill: {loss: [kd, at]}", ["distill.options.at.teacher_layers: layer 'layer1' (its default: the config does not "
                                   "set distill.options.at.teacher_layers) is not a module of the teacher", "set it to"]),
    ("distill: {options: {kd: {beta: 1}}}", ["distill.options.kd.beta", "unknown key", "alpha, temperature"]),
    ("distill: {options: {kd: {temperature: 0}}}", ["distill.options.kd", "temperature", "> 0"]),
    ("distill: {options: {ce: {}}}", ["distill.options.ce", "not in distill.loss"]),
    ("teacher: {model: {arch: vgg99}}", ["teacher.model.arch", "vgg19"]),
    ("student: {source: named, model: {arch: vgg99}}", ["student.model.arch", "vgg19"]),
])
def test_plugin_names_and_options_checked_before_the_run(tmp_path, text, words):
    """The config imports no plugin; ``check_plugins`` (run by the pipeline before it writes the
    run directory) checks names and options against the registries."""
    from ptd.pipeline import check_plugins

    cfg = load_config(write(tmp_path, text))  # plain data: parses
    with pytest.raises(ConfigError) as e:
        check_plugins(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_plugin_errors_fail_before_the_run_dir_is_written(tmp_path):
    from ptd.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="distill.loss"):
        run_pipeline(load_config(None, ["distill.loss=fancy"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_loss_list_and_kd_options_parse():
    cfg = load_config(None, ["distill.loss=[kd]", "distill.options={kd: {temperature: 4}}"])
    assert cfg.distill.loss == ("kd",) and cfg.distill.losses == ("kd",)
    from ptd.pipeline import check_plugins

    check_plugins(cfg)
    assert load_config().distill.losses == ("kd",)


def test_cli_override_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["distill.alpha"])
    with pytest.raises(ConfigError, match="command line"):
        load_config(None, ["distill.alpah=0.3"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_to_dict_is_plain():
    d = to_dict(RunConfig())
    assert isinstance(d["distill"]["seeds"], list) and d["prune"]["rate"] == 0.2


CONFIGS = sorted((__import__("pathlib").Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    from ptd.models import build_model

    m = cfg.teacher.model
    build_model(m.arch, num_classes=10, in_channels=3, width=m.width, **m.kwargs)  # the arch really builds


def test_paper_recipes_match_paper_md():
    c = load_config(CONFIGS[0].parent / "cifar100_vgg19.yaml")
    assert (c.teacher.model.arch, c.prune.target_sparsity, c.distill.alpha, c.distill.temperature) == ("vgg19", 0.79, 0.95, 10.0)
    assert c.prune.retrain.epochs == 130 and c.prune.retrain.milestones == (39, 84)
    t = load_config(CONFIGS[0].parent / "tiny_imagenet_resnet18.yaml")
    assert t.teacher.model.arch == "resnet18" and t.prune.target_sparsity == 0.59 and t.prune.retrain.batch_size == 512
    # the paper's students: its exact width rule, not a device's rounding (auto would give 8 on a
    # CPU and 32 on a GPU: other students, and another on each device)
    for r in (c, t):
        assert (r.student.source, r.student.round_to, r.prune.retrain_checkpoint) == ("derive", 1, "last")


def test_a_sweep_takes_one_loss_and_one_teacher(tmp_path):
    from ptd.pipeline import check_plugins

    check_plugins(load_config(write(tmp_path, "distill: {loss: [kd, dkd]}")))  # a run compares losses
    with pytest.raises(ConfigError, match=r"^distill.loss: \['kd', 'dkd'\] lists 2 losses, and a sweep distills with one"):
        check_plugins(load_config(write(tmp_path, "distill: {loss: [kd, dkd]}")), sweep=True)
    with pytest.raises(ConfigError, match=r"^teacher.seeds: 2 teacher replicates are for ptd run"):
        check_plugins(load_config(write(tmp_path, "teacher: {seeds: 2}")), sweep=True)


# ---------------------------------------------------------------- a config file too large to be one (bad-input audit F10)


def test_a_config_file_larger_than_any_config_is_refused_before_it_is_read(tmp_path, capsys):
    """A 600 MB config (one comment line) was read whole, then parsed by PyYAML for minutes, without
    a word. Past MAX_CONFIG_BYTES it is one line, from the CLI and from load_config alike."""
    from ptd.cli import main

    MAX_CONFIG_BYTES = 2**20  # ptd.config.MAX_CONFIG_BYTES, checked last
    tail = "\nnot_a_key: 1\n"  # unknown: the old code, which parsed it all, refused this instead
    big = write(tmp_path, "#" * (MAX_CONFIG_BYTES + 1 - len(tail)) + tail)
    want = (f"{big}: {MAX_CONFIG_BYTES + 1:,} bytes, more than a config can be (at most {MAX_CONFIG_BYTES:,}; a real one "
            f"is a few KB), so it was not read; pass a YAML config (see configs/)")
    with pytest.raises(ConfigError) as e:
        load_config(big)
    assert str(e.value) == want
    for cmd in (["train", str(big), "--out", str(tmp_path / "o")], ["eval", str(tmp_path / "m.safetensors"), str(big)]):
        assert main(cmd) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and cap.err == f"ptd: error: {want}\n", cap.err
    assert not (tmp_path / "o").exists()
    # one byte less is read (and refused for its key, not its size)
    at_cap = write(tmp_path, "#" * (MAX_CONFIG_BYTES - len(tail)) + tail)
    with pytest.raises(ConfigError, match=r"^not_a_key \(.*c\.yaml\): unknown key"):
        load_config(at_cap)
    from ptd import config

    assert config.MAX_CONFIG_BYTES == MAX_CONFIG_BYTES


def test_a_config_that_is_not_text_is_one_line_from_load_config_too(tmp_path):
    """The CLI's check and load_config read a config through one reader (read_config_text): a
    binary file was a bare UnicodeDecodeError from load_config (ptd export reads a run's config.yaml by it)."""
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(ConfigError, match=r"c\.yaml: cannot be read as a YAML text file \(UnicodeDecodeError: .*\); pass a YAML config"):
        load_config(p)


# ---------------------------------------------------------------- a key with a space in it is named so (bad-input audit F11)


def test_an_override_key_with_spaces_around_a_part_is_refused_saying_so(capsys, tmp_path):
    """--set 'teacher .optim.lr=0.1' said "teacher  (command line): unknown key", the space unseen."""
    from ptd.cli import main

    want = ("override 'teacher .optim.lr=0.1': the key part 'teacher ' has spaces around it; write the key without them: "
            "--set 'teacher.optim.lr=0.1'")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["teacher .optim.lr=0.1"])
    assert str(e.value) == want
    assert main(["train", str(write(tmp_path, "name: x\n")), "--set", "teacher .optim.lr=0.1", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"ptd: error: {want}\n" and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"the key part ' optim' has spaces around it; write the key without them: --set 'teacher.optim.lr=0.1'"):
        load_config(None, ["teacher. optim.lr=0.1"])
    assert load_config(None, [" teacher.optim.lr = 0.1"]).teacher.optim.lr == 0.1  # around the whole key: unambiguous, as before


def test_an_unknown_yaml_key_with_spaces_is_quoted(tmp_path):
    p = write(tmp_path, '"teacher ": {}\n')
    with pytest.raises(ConfigError, match=r"^'teacher ' \(.*c\.yaml\): unknown key; valid keys: name,"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^teacher\.optim\.lrx \(command line\): unknown key"):  # a plain key stays unquoted
        load_config(None, ["teacher.optim.lrx=1"])


# ---------------------------------------------------------------- a config path that is a link loop or dangles (F6's class)


def test_a_config_path_that_is_a_link_loop_or_dangles_is_named_so(tmp_path):
    """Both were "config file not found", which sends the user looking for a typo."""
    loop = tmp_path / "loop.yaml"
    loop.symlink_to("loop.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(loop)
    assert str(e.value) == f"config {loop} cannot be opened (Too many levels of symbolic links); pass the path of a YAML file (see configs/)"
    dangling = tmp_path / "d.yaml"
    dangling.symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(dangling)
    assert str(e.value) == (f"config {dangling} is a symbolic link to {tmp_path / 'gone.yaml'}, which does not exist; fix the "
                            f"link or pass the path of a YAML file (see configs/)")
    with pytest.raises(ConfigError, match=r"^config file not found: .*nope\.yaml; pass the path of a YAML file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("where", ["yaml", "set"])
def test_only_true_and_false_are_booleans(tmp_path, where):
    """PyYAML's YAML 1.1 read off/on/yes/no as booleans: ``compile: off`` (a documented value) was
    refused as "expected a string, got False". A bool key given one is told the two it takes."""
    def load(text: str):
        if where == "set":
            return load_config(None, [t.replace(": ", "=") for t in text.splitlines()])
        (tmp_path / "c.yaml").write_text(text)
        return load_config(tmp_path / "c.yaml")

    assert load("compile: off").compile == "off"
    assert load("fast_wgrad: false\nquiet: True").fast_wgrad is False
    assert load("fast_wgrad: false\nquiet: True").quiet is True
    for word in ("on", "no", "yes", "off"):
        with pytest.raises(ConfigError, match=f"fast_wgrad .*expected true or false, got '{word}'"):
            load(f"fast_wgrad: {word}")
    # the run's own record still reads back: safe_dump quotes a string like 'off'
    cfg = load("compile: off")
    (tmp_path / "back.yaml").write_text(dump_yaml(cfg))
    assert load_config(tmp_path / "back.yaml") == cfg


def test_a_mapping_key_given_null_is_told_the_empty_mapping():
    """teacher.model.kwargs=null was told "write one after the key", not that {} is the empty one."""
    with pytest.raises(ConfigError, match=r"^teacher\.model\.kwargs \(command line\): expected a mapping, got no value \(null\); write \{\} for an empty one$"):
        load_config(None, ["teacher.model.kwargs=null"])
    assert load_config(None, ["teacher.model.kwargs={}"]).teacher.model.kwargs == {}
