"""Scenario parsing: defaults, overrides, and one clear error per kind of bad input.

Parsing checks keys, types and ranges; registry names are checked at the edge
(:func:`fedsim.run.check`), so the bad-input tests load and then check, as ``fedsim run`` does.
"""

import dataclasses

import pytest

from fedsim.config import Scenario, apply_override, load_scenario, parse_value, replace
from fedsim.errors import ScenarioError
from fedsim.run import check


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_quickstart_parses_into_frozen_dataclasses():
    scn = load_scenario("scenarios/quickstart.toml")
    assert scn.name == "quickstart"
    assert scn.partition.kind == "dirichlet" and scn.partition.alpha == 0.5
    assert scn.model.norm == "gn" and scn.server.rounds == 10
    with pytest.raises(AttributeError):
        scn.seed = 3  # frozen


def test_set_overrides_keys_with_toml_values():
    scn = load_scenario("scenarios/quickstart.toml",
                        ["model.norm=bn", "server.rounds=2", "partition.alpha=0.1",
                         'partition.transforms=["rotate"]', "server.strategy=fedprox",
                         "server.params.proximal_mu=0.5"])
    assert scn.model.norm == "bn" and scn.server.rounds == 2 and scn.partition.alpha == 0.1
    assert scn.partition.transforms == ("rotate",)
    assert scn.server.params == {"proximal_mu": 0.5}


def test_replace_revalidates():
    scn = Scenario()
    assert replace(scn, ["seed=4"]).seed == 4
    with pytest.raises(ScenarioError, match="partition.alpha"):
        replace(scn, ["partition.alpha=0"])


def test_parse_value_falls_back_to_string():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("bn") == "bn"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[modle]\nnorm='bn'", r"unknown key 'modle' \(did you mean 'model'\?\)"),
        ("[model]\nnrom='bn'", r"unknown key 'model.nrom' \(did you mean 'norm'\?\)"),
        ("[partition]\nalpha=0", r"partition.alpha = 0.0 is out of range; it must be > 0"),
        ("[partition]\nalpha=-1.5", r"partition.alpha"),
        ("[partition]\nnum_clients=0", r"partition.num_clients"),
        ("[partition]\nnum_clients='ten'", r"partition.num_clients must be an integer"),
        ("[client]\nlr=true", r"client.lr must be a number"),
        ("[server]\nclients_per_round=30\n[partition]\nnum_clients=20",
         r"server.clients_per_round = 30 exceeds the 20 participating"),
        ("[model]\nnorm='batch'", r"unknown norm in model.norm = 'batch'.*choose one of"),
        ("[model]\narch='vgg'", r"unknown arch in model.arch"),
        ("[data]\nname='imagenet'", r"unknown dataset in data.name"),
        ("[server]\nstrategy='fedavgg'", r"unknown strategy.*did you mean 'fedavg'"),
        ("[engine]\nkind='spark'", r"unknown engine in engine.kind"),
        ("[server.dp]\ndelta=1.0", r"server.dp.delta = 1.0 is out of range; it must be in"),
        ("[partition]\nkind='zipf'", r"unknown partition in partition.kind"),
        ("seed = [", r"not valid TOML"),
        ("data = 3", r"data must be a table"),
    ],
)
def test_bad_scenarios_raise_one_clear_error(tmp_path, text, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        check(load_scenario(write(tmp_path, text)))


def test_set_of_unknown_key_is_refused():
    with pytest.raises(ScenarioError, match=r"--set model.nrom: unknown key 'model.nrom'"):
        apply_override({}, "model.nrom=bn")
    with pytest.raises(ScenarioError, match="section.key=value"):
        apply_override({}, "model.norm")
    with pytest.raises(ScenarioError, match="is not a table"):
        apply_override({}, "seed.x=1")


def test_missing_file():
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario("no/such/file.toml")


def test_strategy_params_must_fit_the_constructor(tmp_path):
    path = write(tmp_path, "[server]\nstrategy='fedadam'\n[server.params]\netaa=0.1")
    with pytest.raises(ScenarioError, match=r"\[server.params\] do not fit FedAdam.*accepts:"):
        check(load_scenario(path))


CLAIM = ('[[claims]]\nname = "GN beats BN"\na = { "model.norm" = "gn" }\n'
         'b = { "model.norm" = "bn" }\n')


def test_claims_parse_into_frozen_dataclasses_and_round_trip(tmp_path):
    import tomli_w

    from fedsim.config import ClaimConfig

    text = CLAIM + ('[[claims]]\nname = "LN leaks less"\nmetric = "privacy.mia.loss.auc"\n'
                    'a = { model.norm = "ln" }\nb = { model.norm = "bn" }\nexpect = "a < b"\n'
                    'at = "matched_accuracy"\n')
    scn = load_scenario(write(tmp_path, text))
    assert scn.claims == (
        ClaimConfig("GN beats BN", "final.global_test_accuracy", {"model.norm": "gn"},
                    {"model.norm": "bn"}, "a > b", "final"),
        ClaimConfig("LN leaks less", "privacy.mia.loss.auc", {"model.norm": "ln"},
                    {"model.norm": "bn"}, "a < b", "matched_accuracy"))
    with pytest.raises(AttributeError):
        scn.claims[0].metric = "x"
    again = load_scenario(write(tmp_path, tomli_w.dumps(scn.to_dict()), "again.toml"))
    assert again == scn and load_scenario("scenarios/quickstart.toml").claims == ()


@pytest.mark.parametrize(("extra", "pattern"), [
    ('expect = "a >= b"\n', r"claims\[0\].expect = 'a >= b' is out of range; use one of "
                            r"\['a > b', 'a < b'\]"),
    ('at = "best"\n', r"claims\[0\].at = 'best' is out of range"),
    ("metric = 3\n", r"claims\[0\].metric must be a string, got 3"),
    ('metrc = "x"\n', r"unknown key 'claims\[0\].metrc' \(did you mean 'metric'\?\)"),
    ('name = ""\n', r"claims\[0\].name is missing or blank; give the claim a name"),
    ('name = " \\t"\n', r"claims\[0\].name is missing or blank"),
    ("", r"claims\[0\].name is missing or blank"),  # no name at all (it ran as "-")
])
def test_bad_claims_name_the_key(tmp_path, extra, pattern):
    text = CLAIM.replace('name = "GN beats BN"\n', "") + extra
    if "name" not in extra and extra:
        text += 'name = "x"\n'
    with pytest.raises(ScenarioError, match=pattern):
        load_scenario(write(tmp_path, text))


def test_two_claims_may_not_share_a_name(tmp_path):
    second = CLAIM.replace('"gn"', '"ln"').replace('"GN beats BN"', '" GN beats BN "')
    with pytest.raises(ScenarioError, match=r"claims\[1\].name = ' GN beats BN ' is also the "
                                            r"name of claims\[0\]; give each claim its own"):
        load_scenario(write(tmp_path, CLAIM + second))


@pytest.mark.parametrize(("a", "b", "pattern"), [
    ('{ "model.norm" = "gn" }', '{ "client.batch_size" = 4 }', "a and b must fix the same axes"),
    ('{ "model.norm" = "gn" }', '{ "model.norm" = "gn" }', "a and b select the same cells"),
    ("{}", '{ "model.norm" = "gn" }', r"claims\[0\].a must fix at least one sweep axis"),
    ('"gn"', '{ "model.norm" = "gn" }', r"claims\[0\].a must be a table"),
])
def test_claim_arms_are_checked(tmp_path, a, b, pattern):
    text = f'[[claims]]\nname = "x"\na = {a}\nb = {b}\n'
    with pytest.raises(ScenarioError, match=pattern):
        load_scenario(write(tmp_path, text))


@pytest.mark.parametrize(("key", "value", "pattern"), [
    ("sharpness_samples", 0, r"output.sharpness_samples = 0 is out of range; it must be >= 1"),
    ("sharpness_iters", 0, r"output.sharpness_iters = 0 is out of range"),
    ("sharpness_draws", -1, r"output.sharpness_draws = -1 is out of range"),
    ("sharpness_radius", 0, r"output.sharpness_radius = 0.0 is out of range; it must be in"),
    ("sharpness_radius", 1.5, r"output.sharpness_radius = 1.5 is out of range"),
    ("sharpness", 1, r"output.sharpness must be true or false"),
])
def test_flatness_settings_are_checked(tmp_path, key, value, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        load_scenario(write(tmp_path, f"[output]\n{key} = {value}"))


def test_a_claim_without_arms_compares_two_metrics_of_the_same_cells(tmp_path):
    text = ('[[claims]]\nname = "LiRA beats loss"\n'
            'metric = "privacy.mia.lira_offline.tpr_at_fpr_1e-2"\n'
            'metric_b = "privacy.mia.loss.tpr_at_fpr_1e-2"\n')
    (claim,) = load_scenario(write(tmp_path, text)).claims
    assert (claim.a, claim.b, claim.metric_b) == ({}, {}, "privacy.mia.loss.tpr_at_fpr_1e-2")
    with pytest.raises(ScenarioError, match=r"claims\[0\].a must fix at least one sweep axis"):
        load_scenario(write(tmp_path, '[[claims]]\nname = "no arms, one metric"\n'))


# ------------------------------------------------------------------ FEDSIM_MAX_ROUNDS


def test_max_rounds_caps_every_scenario_and_the_rounds_its_audits_read(monkeypatch):
    monkeypatch.setenv("FEDSIM_MAX_ROUNDS", "2")
    scn = load_scenario("scenarios/privacy_audit.toml", ["privacy.client_mia.round=7",
                                                         "privacy.leakage.round=3"])
    assert scn.server.rounds == 2 and scn.privacy.client_mia.round == 2
    assert scn.privacy.leakage.round == 2
    assert scn.privacy.inversion.round == 1  # already inside the cap
    assert replace(scn, ["server.rounds=5"]).server.rounds == 2  # overrides are capped too
    assert load_scenario("scenarios/quickstart.toml", ["server.rounds=1"]).server.rounds == 1
    monkeypatch.setenv("FEDSIM_MAX_ROUNDS", "1")
    assert load_scenario("scenarios/privacy_audit.toml",
                         ["privacy.inversion.round=3"]).privacy.inversion.round == 1


def test_without_max_rounds_nothing_changes(monkeypatch):
    monkeypatch.delenv("FEDSIM_MAX_ROUNDS", raising=False)
    scn = load_scenario("scenarios/privacy_audit.toml")
    assert scn.server.rounds == 10 and scn.privacy.client_mia.round == 0


@pytest.mark.parametrize("value", ["0", "x", "-1", "1.5"])
def test_a_bad_max_rounds_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("FEDSIM_MAX_ROUNDS", value)
    with pytest.raises(ScenarioError, match=r"FEDSIM_MAX_ROUNDS=.* must be a whole number >= 1"):
        load_scenario("scenarios/quickstart.toml")


# --------------------------------------------------------------------------- [privacy] spelling

#: a [privacy] section in the flat spelling of earlier files (scenarios/privacy_audit.toml's)
FLAT_PRIVACY = """
[privacy]
mia = ["loss", "lira"]
shadows = 8
fix_variance = true
audit_every = 2
client_mia = true
client_round = 0
leakage = true
inversion = true
inversion_round = 1
inversion_batch = 4
canary_clients = 12
"""


def test_flat_privacy_keys_are_refused_with_their_new_spelling(tmp_path):
    with pytest.raises(ScenarioError) as err:
        load_scenario(write(tmp_path, FLAT_PRIVACY))
    msg = str(err.value)
    assert "\n" not in msg
    for spelled in ['privacy.audits = ["mia", "client_mia", "leakage", "inversion", '
                    '"canary_clients"]', 'privacy.mia.attacks = ["loss", "lira"]',
                    "privacy.canary_clients.count = 12", "privacy.shadows → privacy.mia.shadows",
                    "privacy.fix_variance → privacy.mia.lira.fix_variance",
                    "privacy.audit_every → privacy.mia.every (and privacy.exposure.every)",
                    "privacy.client_round → privacy.client_mia.round (and "
                    "privacy.leakage.round, privacy.exposure.round)",
                    "privacy.inversion_batch → privacy.inversion.batch"]:
        assert spelled in msg


def test_the_new_spelling_parses_to_what_the_message_says(tmp_path):
    scn = load_scenario(write(tmp_path, """
[privacy]
audits = ["mia", "client_mia", "leakage", "inversion", "canary_clients"]
mia.attacks = ["loss", "lira"]
mia.shadows = 8
mia.lira.fix_variance = true
mia.every = 2
inversion.batch = 4
canary_clients.count = 12
"""))
    p = scn.privacy
    assert p.audits == ("mia", "client_mia", "leakage", "inversion", "canary_clients")
    assert p.mia.attacks == ("loss", "lira") and p.mia.lira.fix_variance and p.mia.every == 2
    assert p.inversion.batch == 4 and p.client_canaries == 12 and p.sample_canaries == 0
    assert load_scenario("scenarios/quickstart.toml").privacy.client_canaries == 0


@pytest.mark.parametrize(("assignment", "pattern"), [
    ("privacy.shadows=2", r"--set privacy.shadows: 'privacy.shadows' moved: it is "
                          r"privacy.mia.shadows now"),
    ("privacy.inversion_steps=5", "it is privacy.inversion.steps now"),
    ("privacy.rmia_population=100", "it is privacy.mia.population now"),
    ("privacy.inversion=true", r'privacy.audits = \["inversion"\]'),
    ('privacy.mia=["rmia"]', r'privacy.audits = \["mia"\]; privacy.mia.attacks = \["rmia"\]'),
    ("privacy.canary_samples=40", r"privacy.canary_samples.count = 40"),
])
def test_a_flat_privacy_override_names_the_new_key(assignment, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        load_scenario("scenarios/quickstart.toml", [assignment])


def test_every_moved_privacy_key_names_a_key_that_exists():
    """The message's spellings are real: each new key parses, each old switch is the name of
    a registered audit."""
    import fedsim.plugins  # noqa: F401  the audits register
    from fedsim.config import MOVED_PRIVACY_KEYS, PRIVACY_SWITCHES, PrivacyConfig
    from fedsim.privacy.audits import AUDITS

    fields = {f.name for f in dataclasses.fields(PrivacyConfig)}
    for old, new in MOVED_PRIVACY_KEYS.items():
        key = new.split()[0]
        value = "true" if old in ("fix_variance", "shadow_reseed", "bn_buffers_shared") else (
            '"train"' if old == "bn_mode" else '"step"' if old == "inversion_target" else "1")
        audit = key.split(".")[0]
        load_scenario("scenarios/quickstart.toml", [f'privacy.audits=["{audit}"]',
                                                    f"privacy.{key}={value}"])  # parses
        assert old not in fields
    assert all(switch in AUDITS for switch in PRIVACY_SWITCHES)


@pytest.mark.parametrize(("assignments", "pattern"), [
    (["privacy.inversion.steps=5"],
     r"\[privacy.inversion\] is set, but privacy.audits does not name 'inversion', so that "
     r'audit would not run; add it \(privacy.audits = \["inversion"\]\) or drop the section'),
    (['privacy.audits=["mia"]', "privacy.leakage.round=2"],
     r'privacy.audits = \["mia", "leakage"\]'),
    (['privacy.audits=["leakage"]', "privacy.mia.lira.fix_variance=true"],
     r"\[privacy.mia\] is set, but privacy.audits does not name 'mia'"),
    (["privacy.exposure.canaries=8"],  # a count alone does not switch the audit on
     r'\[privacy.exposure\] is set.* \(privacy.audits = \["exposure"\]\)'),
])
def test_a_section_of_an_audit_that_is_not_listed_is_refused(assignments, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        load_scenario("scenarios/quickstart.toml", assignments)


def test_a_listed_audit_s_section_parses():
    scn = load_scenario("scenarios/quickstart.toml", ['privacy.audits=["leakage"]',
                                                      "privacy.leakage.round=2"])
    assert scn.privacy.leakage.round == 2
