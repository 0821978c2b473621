"""The docs' option and settings tables against the code they describe: a field added without a row, or a row
left for a removed field, fails here."""

from __future__ import annotations

import re

from app.config import Settings
from app.params import TrainParams
from tests.helpers import REPO_ROOT

DOCS = REPO_ROOT / "docs"
# Variables the docs describe that belong to a library, not to Settings.
LIBRARY_VARIABLES = {"HF_HUB_OFFLINE", "LOCAL_WORLD_SIZE"}
# Command-line options that are not training parameters.
CLI_ONLY_OPTIONS = {"--data-dir", "--data", "--val-data", "--output-dir", "--tracker", "--json"}


def first_cells(path) -> list[str]:
    """The names in backticks in the first cell of each table row of ``path``."""
    rows = [line for line in path.read_text().splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])]


def test_every_setting_has_one_row_and_every_row_a_setting():
    documented = [
        name for doc in ("configuration.md", "tracking.md") for name in first_cells(DOCS / doc) if name.isupper()
    ]
    settings = {name.upper() for name in Settings.model_fields}
    assert sorted(settings - set(documented)) == [], "settings without a row in docs/configuration.md"
    assert sorted(set(documented) - settings - LIBRARY_VARIABLES) == [], "rows for variables Settings lacks"


def test_every_training_parameter_has_a_row_with_its_default():
    rows = {
        name: line
        for line in (DOCS / "training.md").read_text().splitlines()
        if line.startswith("| `--")
        for name in re.findall(r"`(--[a-z-]+)`", re.sub(r"\(.*?\)", "", line.split("|")[1]))  # not the aliases
    }
    options = {"--" + name.replace("_", "-"): info for name, info in TrainParams.model_fields.items()}
    assert sorted(set(options) - set(rows)) == []
    assert sorted(set(rows) - set(options) - CLI_ONLY_OPTIONS) == []
    for option, info in options.items():
        default = info.default
        if isinstance(default, bool):
            expected = str(default).lower()
        elif isinstance(default, int | float) and not isinstance(default, bool):
            expected = f"{default:g}"
        else:
            continue  # None and names: described in words ("all", "off", the model's name)
        shown = rows[option].split("|")[2].strip().strip("`")
        assert float(shown) == float(expected) if expected[0].isdigit() else shown == expected, option


def test_the_readme_code_map_names_every_module_where_it_lives():
    """Each module of a package under app/ is named in that package's row of the README's Code map (as ``name.py``
    or ``name``), and each ``*.py`` the row names exists."""
    rows = {
        cells[1].strip().strip("`"): cells[2]
        for line in (REPO_ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `app/") and (cells := line.split("|"))
    }
    missing, stale = [], []
    for package in ("api", "engine", "ops", "service"):
        row = rows[f"app/{package}/"]
        folder = REPO_ROOT / "app" / package
        for module in folder.rglob("*.py"):
            name = module.stem
            if name != "__init__" and f"`{name}.py`" not in row and f"`{name}`" not in row:
                missing.append(str(module.relative_to(REPO_ROOT)))
        stale += [f"app/{package}/{n}" for n in re.findall(r"`(\w+\.py)`", row) if not (folder / n).exists()]
    assert missing == [] and stale == [], f"not in the Code map: {missing}; named but gone: {stale}"


def test_the_role_table_in_security_md_is_the_code_s():
    """docs/security.md's "Keys and roles" table says, for each action, what it opens and which roles may do it:
    exactly ``ACTIONS`` and ``ROLES`` of app/service/keys.py."""
    from app.service.keys import ACTIONS, ROLES

    text = (DOCS / "security.md").read_text()
    section = text[text.index("## Keys and roles") :]
    section = section[: section.index("\n## ")]
    header = next(line for line in section.splitlines() if line.startswith("| action |"))
    roles = [cell.strip() for cell in header.strip("|").split("|")][2:]
    documented = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            action, opens, *allowed = [cell.strip() for cell in line.strip("|").split("|")]
            may = {role for role, cell in zip(roles, allowed, strict=True) if cell == "yes"}
            documented[action.strip("`")] = (opens, may)
    assert sorted(roles) == sorted(ROLES)
    assert documented == {a: (opens, {r for r in ROLES if a in ROLES[r]}) for a, opens in ACTIONS.items()}
