"""The README's install and test commands (its first screen) are the ones CI runs (``.ci/run``)."""
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    """(install, test) from the README's first bash block: the line that installs and runs the tests."""
    block = re.search(r'```bash\n(.*?)```', (ROOT / 'README.md').read_text(), re.S).group(1)
    lines = [line for line in block.splitlines() if 'pytest' in line and not line.lstrip().startswith('#')]
    assert len(lines) == 1, lines
    steps = lines[0].split(' && ')
    install = [s for s in steps if s.startswith('pip install')]
    test = [s for s in steps if 'pytest' in s]
    assert len(install) == 1 and len(test) == 1, steps
    return shlex.split(install[0]), shlex.split(test[0])


def _ci_commands():
    """(install, test) from ``.ci/run``: the command after ``# README: install`` and after ``# README: test``."""
    lines = [line.strip() for line in (ROOT / '.ci' / 'run').read_text().splitlines()]
    found = []
    for marker in ('# README: install', '# README: test'):
        assert lines.count(marker) == 1, f'.ci/run must mark its {marker[10:]} command once'
        command = lines[lines.index(marker) + 1]
        assert command and not command.startswith('#'), command
        found.append(shlex.split(command))
    return found


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme_install, readme_test = _readme_commands()
    ci_install, ci_test = _ci_commands()
    # the only allowed difference: CI keeps pip quiet
    assert [a for a in ci_install if a != '-q'] == readme_install
    assert ci_test == readme_test
    assert readme_install == ['pip', 'install', '-e', '.[dev]'] and readme_test[:3] == ['python', '-m', 'pytest']
