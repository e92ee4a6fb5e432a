"""Scenarios from a TOML file (``fedrank simulate --scenario-file FILE``) and the ``data`` key.

A scenario file::

    name = "my-shop"            # default: the file's stem
    base = "regional-3"         # optional: start from a named scenario, override below
    partition = "regional"      # or "device" (required without base)
    rounds = 5                  # default server rounds (required without base)
    description = "our catalog, three regions"
    data = "imported/"          # judged-search directory (fedrank data import); relative
                                # paths are relative to this file; default: bundled WANDS

    [world]                     # shared_model.world.WorldConfig fields
    num_users = 2000
    num_regions = 3

    [run_config]                # kebab-case run settings (shared_model.settings)
    learning-rate = 0.5

Unknown keys are errors naming the key; nothing is run before the file is fully checked.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from shared_model.settings import RunSettings
from shared_model.world import WorldConfig
from simulations.scenarios import Scenario, get_scenario

__all__ = ["load_scenario_file"]

_TOP_KEYS = {"name", "base", "partition", "rounds", "description", "data", "world", "run_config"}


def load_scenario_file(path: Path) -> tuple[Scenario, Path | None]:
    """The scenario a TOML file describes, and its ``data`` directory (``None`` = default).

    Raises
    ------
    ValueError
        Naming the file and the bad key or value (unreadable file, TOML syntax, unknown
        key, unknown base scenario, bad world field or run setting, missing data folder).
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: scenario file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read scenario file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(_TOP_KEYS))}"
        )
    base: Scenario | None = None
    if "base" in raw:
        try:
            base = get_scenario(str(raw["base"]))
        except KeyError as exc:
            raise ValueError(f"{path}: base: {exc.args[0]}") from None
    for key in ("partition", "rounds"):
        if base is None and key not in raw:
            raise ValueError(f"{path}: missing key {key!r} (or name a base scenario)")
    world_raw = raw.get("world", {})
    run_raw = raw.get("run_config", {})
    for key, table in (("world", world_raw), ("run_config", run_raw)):
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {key} must be a table ([{key}])")
    world_fields = {f.name for f in dataclasses.fields(WorldConfig)}
    bad_world = sorted(set(world_raw) - world_fields)
    if bad_world:
        raise ValueError(
            f"{path}: unknown [world] key(s) {', '.join(bad_world)}; expected "
            f"{', '.join(sorted(world_fields))}"
        )
    try:
        world = dataclasses.replace(base.world if base else WorldConfig(), **world_raw)
        run_config: dict[str, Any] = {**(base.run_config if base else {}), **run_raw}
        RunSettings.from_config(run_config)  # unknown keys and bad values fail here
        scenario = Scenario(
            name=str(raw.get("name", path.stem)),
            world=world,
            partition=str(raw.get("partition", base.partition if base else "")),
            rounds=int(raw.get("rounds", base.rounds if base else 0)),
            run_config=run_config,
            description=str(raw.get("description", base.description if base else "")),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    data: Path | None = None
    if "data" in raw:
        data = Path(str(raw["data"])).expanduser()
        if not data.is_absolute():
            data = (path.resolve().parent / data).resolve()
        if not data.is_dir():
            raise ValueError(f"{path}: data: {data} is not a directory")
    return scenario, data
