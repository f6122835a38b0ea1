"""Every CLI option with a home (a config dataclass field, or a parameter of the stage the
command calls) takes its default from there: the values agree, and the CLI reads the value
instead of writing it a second time; the block commands' help reads no torch."""

from __future__ import annotations

import subprocess
import sys

import typer
import typer.main
from typer.testing import CliRunner

from branchlens.cli import app
from branchlens.cli.defaults import Default, home_default, resolve

VARIANT = "branchlens.variants:DEFAULT_VARIANT"
# Each command's homes; an option is compared with every one of them that has its name.
HOMES: dict[str, tuple[str, ...]] = {
    "info": (VARIANT,),
    "classify": (VARIANT, "branchlens.classify:iter_predictions", "branchlens.data:open_source",
                 "branchlens.weights:load_model"),
    "harvest": ("branchlens.settings:HarvestConfig", "branchlens.stages.harvest:harvest",
                "branchlens.data:open_source"),
    "train": (VARIANT, "branchlens.settings:SAEOptions", "branchlens.settings:TrainConfig",
              "branchlens.stages.train:train_layers"),
    "export-sae": ("branchlens.interop:export_run_sae",),
    "import-sae": (VARIANT, "branchlens.interop:import_sae", "branchlens.interop:save_imported"),
    "analyze": ("branchlens.settings:AnalysisConfig", "branchlens.stages.analyze:analyze"),
    "stability": ("branchlens.stages.stability:stability",),
    "effects": ("branchlens.stages.effects:effects",),
    "steer": ("branchlens.run:Run", "branchlens.run:Run.intervene",
              "branchlens.interventions:Intervention.summary"),
    # the block's dataclass, and the stage, whose parameters must agree with it
    "visualize": ("branchlens.settings:VisualizeConfig",
                  "branchlens.stages.visualize:visualize_stage"),
    "examples": ("branchlens.settings:ExamplesConfig", "branchlens.stages.examples:examples_stage"),
    "circuits": ("branchlens.settings:CircuitsConfig", "branchlens.stages.circuits:circuits_stage"),
    "report": ("branchlens.settings:ReportConfig", "branchlens.stages.report:build_report"),
    "run": ("branchlens.pipeline:run",),
    "presets": (),
}
# Options whose home is not their command's usual one.
ELSEWHERE: dict[tuple[str, str], tuple[str, ...]] = {
    # a stage run alone computes where `branchlens run` would (auto), not on the library's cpu
    ("analyze", "device"): ("branchlens.settings:RUN_DEVICE", "branchlens.pipeline:run"),
    ("train", "device"): ("branchlens.settings:RUN_DEVICE", "branchlens.pipeline:run"),
    # classify hands the resolved device to load_model
    ("classify", "device"): ("branchlens.devices:resolve_device",),
}
# The CLI's own defaults, which mean something no home has.
OWN: dict[tuple[str, str], object] = {
    ("train", "lr"): None,  # TrainConfig's, or the paper preset's with --paper
    ("visualize", "objective"): None,  # channel with --channels, else visualize_stage's
    ("run", "preset"): None,  # the --config file's preset, else pipeline.run's
    ("analyze", "layers"): None,  # not given: every trained layer (the stage's None)
    ("import-sae", "variant"): resolve(VARIANT),  # of --layer; import_sae's None: the file's
}


def _value(default: object) -> object:
    return default() if isinstance(default, Default) else default


def _same(cli: object, home: object) -> bool:
    if isinstance(home, (list, tuple)) and isinstance(cli, str):  # --layers a,b
        return cli == ",".join(home)
    return cli == home


def mismatches(app: typer.Typer, homes: dict, elsewhere: dict | None = None,
               own: dict | None = None) -> list[str]:
    """What is wrong with the defaults of ``app``'s options, one line each."""
    elsewhere, own = elsewhere or {}, own or {}
    group = typer.main.get_command(app)
    problems = [f"commands missing from HOMES or gone: {sorted(set(group.commands) ^ set(homes))}"
                ] if set(group.commands) != set(homes) else []
    for name, cmd in group.commands.items():
        for p in cmd.params:
            key, raw, where = (name, p.name), p.default, f"{name} {p.opts[0]}"
            if key in own:
                if _value(raw) != own[key]:
                    problems.append(f"{where}: {_value(raw)!r}, not its own {own[key]!r}")
                continue
            refs = elsewhere.get(key, homes.get(name, ()))
            if isinstance(raw, Default) and raw.home not in refs:
                problems.append(f"{where}: read from {raw.home}, not from one of {refs}")
            expected = {}
            for ref in refs:
                try:
                    expected[ref] = (resolve(ref) if isinstance(raw, Default) and raw.name is None
                                     and ref == raw.home else home_default(resolve(ref), p.name))
                except KeyError:
                    pass
            if expected and not isinstance(raw, Default):
                problems.append(f"{where}: {raw!r} is written in the CLI; read it from "
                                f"{', '.join(expected)}")
            problems += [f"{where}: {_value(raw)!r}, but {ref} says {want!r}"
                         for ref, want in expected.items() if not _same(_value(raw), want)]
    return problems


def test_every_option_with_a_home_takes_its_default_from_there():
    assert mismatches(app, HOMES, ELSEWHERE, OWN) == []


def test_a_default_written_twice_or_read_from_elsewhere_is_caught():
    bad = typer.Typer()

    @bad.callback()
    def _group() -> None: ...

    @bad.command()
    def analyze(q: float = typer.Option(0.01, "--q"),  # differs from AnalysisConfig.q
                n_perm: int = typer.Option(1000, "--n-perm"),  # equal, but written twice
                seed: int = typer.Option(Default("branchlens.stages.visualize:visualize_stage",
                                                 "seed"), "--seed"),
                embed: str = typer.Option(Default("branchlens.analysis.config:AnalysisConfig",
                                                  "embed"), "--embed")) -> None: ...

    found = mismatches(bad, {"analyze": ("branchlens.analysis.config:AnalysisConfig",),
                             "other": ()})
    assert len(found) == 5, found
    assert "missing from HOMES or gone: ['other']" in found[0]
    assert any("--q: 0.01, but branchlens.analysis.config:AnalysisConfig says 0.05" in f
               for f in found)
    assert sum("--q: 0.01 is written in the CLI" in f or "--n-perm: 1000 is written in the CLI"
               in f for f in found) == 2
    assert any("--seed: read from branchlens.stages.visualize:visualize_stage" in f
               for f in found)
    assert not any("--embed" in f for f in found)


def test_help_shows_the_homes_values_and_nothing_for_none():
    from branchlens.analysis.config import AnalysisConfig

    text = CliRunner().invoke(app, ["analyze", "--help"], env={"COLUMNS": "200"}).stdout
    lines = {ln.split()[1]: ln for ln in text.splitlines() if ln.startswith("│ ") and "--" in ln}
    assert f"[default: {AnalysisConfig().q}]" in lines["--q"]
    assert f"[default: {AnalysisConfig().embed}]" in lines["--embed"]
    assert "[default" not in lines["--max-perm"]  # None, like a literal None


# Commands whose --help reads every default from the ground floor (branchlens.settings).
LIGHT_HELP = ("analyze", "train", "visualize", "examples", "circuits", "report", "presets")


def test_block_commands_help_imports_no_torch():
    """``branchlens analyze --help`` took 7 s when its defaults lived beside torch."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom branchlens.cli import app\n"
            f"for cmd in {LIGHT_HELP!r}:\n"
            "    r = CliRunner().invoke(app, [cmd, '--help'])\n"
            "    assert r.exit_code == 0 and '--' in r.stdout, (cmd, r.output)\n"
            "    heavy = sorted(m for m in ('torch', 'numpy') if m in sys.modules)\n"
            "    assert not heavy, f'{cmd} --help imported {heavy}'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
