"""Two tiers: ``python -m pytest -q`` runs the fast tier (tests marked ``slow`` are deselected, not skipped);
``python -m pytest -q --all`` runs everything (what CI runs). ``-m`` chooses by marker as usual."""


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", help="also run the slow tests (processes, signals, sweeps)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--all") or config.getoption("-m"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
