"""The whole experiment: ``run`` (every stage, resumable) and ``presets`` (its settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from branchlens.cli.common import (
    DEVICE_HELP,
    WEIGHTS_HELP,
    command,
    echo_json,
    emit,
    names,
    rank,
    say,
)
from branchlens.cli.defaults import Home
from branchlens.layout import RunLayout

RUN = Home("branchlens.pipeline:run")


@command("run")
def run_cmd(
    source: str | None = RUN.arg("source", help="images; default: the preset's source"),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
    preset: str | None = typer.Option(None, "--preset",
                                      help="demo | sample16x | paper (default: the config "
                                           "file's, else demo); see `branchlens presets`"),
    variant: str | None = RUN.opt("variant", "--variant", help="override the preset's"),
    weights: str | None = RUN.opt("weights", "--weights", help=WEIGHTS_HELP),
    device: str = RUN.opt("device", "--device", help=DEVICE_HELP),
    seed: int | None = RUN.opt("seed", "--seed"),
    paper_compat: bool = RUN.opt("paper_compat", "--paper-compat",
                                 help="the paper's [0,1] input scaling bug"),
    stages: str | None = RUN.opt("stages", "--stages", help="comma list; default: all"),
    force: bool = RUN.opt("force", "--force", help="re-run stages even if up to date"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set train.steps=1000"),
    config: Path | None = typer.Option(None, "--config",
                                       help="TOML or JSON file shaped like a preset (`branchlens "
                                            "presets NAME` prints one), or a run's run.json to "
                                            "repeat it; applied before --set"),
    as_json: bool = typer.Option(False, "--json", help="print the run record's summary as JSON"),
) -> None:
    """Harvest → train → analyze → visualize/examples/circuits → report, resumable."""
    from branchlens.config import ConfigError, load_config_file, parse_set
    from branchlens.pipeline import run

    overrides: dict[str, Any] = load_config_file(config) if config is not None else {}
    for item in set_:
        block, name, value = parse_set(item)
        if not isinstance(overrides.get(block, {}), dict):
            raise ConfigError(f"{config}: {block} must be a mapping")
        overrides.setdefault(block, {})[name] = value
    record = run(out, preset=preset, source=source, weights=weights, device=device,
                 variant=variant, paper_compat=paper_compat, seed=seed, overrides=overrides,
                 stages=names(stages), force=force, log=say)
    if rank() != 0:
        return
    total = sum(s.get("seconds", 0) for s in record["stages"].values())
    report = RunLayout(out).report_index
    if as_json:
        echo_json({"run": str(out), "seconds": round(total, 2),
                   "stages": {k: v.get("status") for k, v in record["stages"].items()},
                   "report": str(report.resolve()) if report.is_file() else None})
        return
    emit(f"run {out} finished ({total:.0f}s of stage time)")
    if report.is_file():
        emit(f"report: {report.resolve()}")


@command()
def presets(
    name: str | None = typer.Argument(None, help="one preset, printed as a TOML config file"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The presets of `branchlens run` and their values (edit one into a --config file)."""
    from branchlens.config import ConfigError, to_toml
    from branchlens.presets import PRESET_NOTES, PRESETS

    if name is not None and name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    chosen = {name: PRESETS[name]} if name else PRESETS
    if as_json:
        echo_json({k: {"preset": k, **v} for k, v in chosen.items()})
        return
    for i, (key, values) in enumerate(chosen.items()):
        if i:
            emit("")
        emit(f"# preset {key}: {PRESET_NOTES.get(key, '')}")
        emit(to_toml({"preset": key, **values}), nl=False)
