"""Dispatch picks the backend and Triton tile config recorded in
tests/ops/fixtures/dispatch_decisions.json at every point of the grid (see
record_dispatch_decisions.py): a move or refactor of the ops layer changes no decision unless the
fixture is recorded again, with the change and its reason in the commit."""

import json

import pytest
import record_dispatch_decisions as recorder


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(recorder.FIXTURE.read_text())


@pytest.fixture(scope="module")
def current() -> dict:
    return json.loads(json.dumps(recorder.decisions()))


@pytest.mark.parametrize("section", ["single", "groups", "tile_configs"])
def test_dispatch_picks_what_was_recorded(section, recorded, current):
    rows = recorded["rows"][section].split()
    assert current["rows"][section].split() == rows
    names = recorded["tile_config_fields"] if section == "tile_configs" else None

    def readable(points: str) -> list[str]:
        return [names[point] if names else point for point in points.split()]

    changed = [f"{key} at {row} rows: recorded {old}, now {new}"
               for key in sorted(recorded[section].keys() | current[section].keys())
               for row, old, new in zip(rows, readable(recorded[section].get(key, "")),
                                        readable(current[section].get(key, "")), strict=False)
               if old != new]
    missing = sorted(recorded[section].keys() ^ current[section].keys())
    assert not missing, f"grid points recorded or computed only on one side: {missing[:5]}"
    assert not changed, f"{len(changed)} decisions changed, e.g.:\n" + "\n".join(changed[:10])
