"The project's promises about itself: one source per fact, README in step, an import with no side effects."
import configparser, json, re, subprocess, sys, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import make_readme

def _settings():
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT/'settings.ini')
    return cfg['DEFAULT']

def _run(code):
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip()

def test_readme_in_step_with_index_notebook():
    assert (ROOT/'README.md').read_text(encoding='utf-8') == make_readme.render(), 'run python tools/make_readme.py'
    assert make_readme.main(['--check']) == 0

def test_readme_check_catches_drift(tmp_path, monkeypatch):
    fake = tmp_path/'README.md'
    fake.write_text(make_readme.render() + 'stale line\n')
    monkeypatch.setattr(make_readme, 'ROOT', tmp_path)
    assert make_readme.main(['--check']) == 1

def test_readme_gives_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT/'README.md').read_text(encoding='utf-8')
    cmds = re.findall(r'```sh\n(.*?)\n```', readme, flags=re.S)
    assert len(cmds) == 2, cmds
    install, tests = cmds
    assert 'pip install' in install and 'fastxtend_ema.demo' in install
    assert tests in (ROOT/'.ci'/'run').read_text(), 'the CI script must run the README test command'

def test_every_pip_install_pins_torch_and_torchvision():
    "The constraint file pins both exactly, and every pip install of the README and of CI passes it (no newer torch sneaks in)"
    pins = [l.split() for l in (ROOT/'.ci'/'constraints.txt').read_text().splitlines() if l.strip() and not l.startswith('#')]
    assert {p[0].split('==')[0] for p in pins} == {'torch', 'torchvision'} and all('==' in p[0] for p in pins), pins
    text = (ROOT/'README.md').read_text(encoding='utf-8') + (ROOT/'.ci'/'run').read_text()
    installs = re.findall(r'pip install[^&\n]*', text)
    assert installs and all('-c .ci/constraints.txt' in i for i in installs), installs

def test_version_has_one_source():
    import fastxtend_ema
    assert fastxtend_ema.__version__ == _settings()['version']
    pyproject = tomllib.loads((ROOT/'pyproject.toml').read_text())
    assert 'version' in pyproject['project']['dynamic'] and 'version' not in pyproject['project']
    assert pyproject['project']['name'] == _settings()['lib_name']
    assert not re.search(r'__version__\s*=\s*["\']\d', (ROOT/'fastxtend_ema'/'__init__.py').read_text())

def _setup_kwargs() -> dict:
    "What setup.py passes to `setuptools.setup`, read without building anything"
    code = ("import json, runpy, setuptools; got = {}; setuptools.setup = lambda **k: got.update(k); "
            f"runpy.run_path({str(ROOT/'setup.py')!r}); "
            "print(json.dumps(dict(install_requires=got['install_requires'], extras=got['extras_require'])))")
    return json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT).stdout)

def _names(reqs) -> set[str]: return {re.split(r'[<>=!~\[; ]', r, maxsplit=1)[0].lower() for r in reqs}

def test_extras():
    "The callback needs torch, fastai and fastcore alone; the demo's and the test suite's needs are extras of their own"
    kw = _setup_kwargs()
    assert _names(kw['install_requires']) == {'torch', 'fastai', 'fastcore'}, kw['install_requires']
    extras = {k: _names(v) for k,v in kw['extras'].items()}
    assert set(extras) == {'demo', 'test', 'bench', 'wandb', 'tensorboard', 'all'}, extras
    assert extras['demo'] == {'scikit-learn', 'matplotlib'}   # what fastxtend_ema.demo imports besides fastai
    # the suite runs the demo, the benchmarks and both loggers, and its vision tests need timm (torchvision comes with fastai)
    assert extras['demo'] | extras['bench'] | extras['wandb'] | extras['tensorboard'] | {'timm', 'nbdev', 'pytest'} <= extras['test']
    assert extras['all'] == set().union(*(v for k,v in extras.items() if k != 'all'))
    assert not {'torch', 'torchvision'} & set().union(*extras.values())   # their versions are the constraint file's alone

def test_import_does_not_need_torchvision_or_change_fastai():
    # fastai's own modules patch Learner when imported: import them first, then check what importing this package adds
    out = _run("import sys, fastai.basics, fastai.callback.fp16, fastai.callback.schedule, fastai.callback.core as c; "
               "from fastai.learner import Learner; "
               "before = (dict(vars(c.defaults)), dict(vars(Learner))); "
               "import fastxtend_ema; from fastxtend_ema import EMACallback, EMASchedule, SchedCos, SchedLin, SchedExp, SchedPoly; "
               "print('torchvision' in sys.modules, before == (dict(vars(c.defaults)), dict(vars(Learner))))")
    assert out == 'False True', out

def test_demo_help():
    out = subprocess.run([sys.executable, '-m', 'fastxtend_ema.demo', '--help'], capture_output=True, text=True, check=True).stdout
    for arg in ('--epochs', '--lr', '--quiet'): assert arg in out

def test_generated_modules_are_marked():
    for p in (ROOT/'fastxtend_ema').glob('*.py'):
        if p.name == '_modidx.py': continue
        assert 'AUTOGENERATED! DO NOT EDIT!' in p.read_text(), p

def test_import_is_cheap():
    "After fastai, importing the package costs a small part of fastai's own import (what distributed runs need loads lazily)"
    code = 'import fastai.basics; import fastxtend_ema; import sys; assert "torch.distributed.tensor" not in sys.modules'
    out = subprocess.run([sys.executable, '-X', 'importtime', '-c', code], capture_output=True, text=True, check=True).stderr
    cum = {}
    for line in out.splitlines():   # "import time: self [us] | cumulative | imported package"
        parts = line.split('|')
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith('  '): cum[parts[2].strip()] = int(parts[1])
    assert cum['fastxtend_ema'] < 0.1*cum['fastai.basics'], cum

def test_license_is_the_declared_one():
    text = (ROOT/'LICENSE').read_text()
    assert text.lstrip().startswith('Apache License') and 'Version 2.0, January 2004' in text
    assert _settings()['license'] == 'apache2'

# ----------------------------------------------------------------------------- the layout (nbs/index.ipynb, "Notebooks")

def _modules() -> dict[str, tuple[int, str]]:
    "module name -> (notebook number, source) for every generated module numbered by its notebook"
    out = {}
    for p in (ROOT/'fastxtend_ema').glob('*.py'):
        m = re.search(r'File to edit: \.\./nbs/(\d+)_', p.read_text()[:600])
        if m: out[p.stem] = (int(m.group(1)), p.read_text())
    return out

def _imports(src:str) -> set[str]:
    "Package modules `src` imports anywhere, lazy imports inside functions included"
    return set(re.findall(r'^\s*from\s+(?:fastxtend_ema)?\.(\w+)\s+import', src, re.M)) | \
           set(re.findall(r'(?:from|import)\s+fastxtend_ema\.(\w+)', src))

def test_modules_import_only_earlier_notebooks():
    mods = _modules()
    assert {'update', 'averager', 'decay', 'loggers', 'checkpoint', 'callback', 'distributed', 'demo', 'test_utils'} <= set(mods)
    back = [f'{m} ({n}) imports {d} ({mods[d][0]})' for m,(n,src) in mods.items() for d in _imports(src) if d in mods and mods[d][0] >= n]
    assert not back, back
    assert _imports("def f():\n    from fastxtend_ema.callback import X\n") == {'callback'}   # the scan sees lazy imports

def test_core_needs_no_fastai():
    for mod in ('update', 'averager', 'decay'):
        _run(f"import sys, fastxtend_ema.{mod}; assert 'fastai' not in sys.modules, sorted(m for m in sys.modules if m.startswith('fastai'))")
    assert _run("import sys, fastxtend_ema; print('fastai' in sys.modules, 'torch' in sys.modules)") == 'False False'

def test_no_test_instrument_in_the_library():
    "Test helpers live in `test_utils` alone; no module but it exports one"
    for m,(_,src) in _modules().items():
        if m != 'test_utils': assert 'count_collectives' not in src and 'TorchDispatchMode' not in src, m

def _doc_texts():
    yield ROOT/'README.md', (ROOT/'README.md').read_text()
    for nb in sorted((ROOT/'nbs').rglob('*.ipynb')):
        yield nb, '\n'.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'])
    for p in sorted((ROOT/'tests').rglob('*.py')): yield p, p.read_text()

def test_docs_point_only_to_files_in_the_repo():
    "Every repository path the docs and tests name exists (no notes kept outside the repo)"
    pat = re.compile(r'(?<![\w/.-])((?:nbs|tests|benchmarks|tools|\.ci)/[\w./-]*\w|[A-Z][A-Z_]+\.md)\b')
    missing = sorted({f'{p.relative_to(ROOT)}: {m}' for p,text in _doc_texts() for m in pat.findall(text)
                      if not (ROOT/m).exists() and '*' not in m and not m.startswith('tests/distributed/rank')})
    assert not missing, missing

def test_every_public_name_has_its_docs():
    "Each name a module exports is shown by `show_doc` in its notebook"
    for m,(n,src) in _modules().items():
        names = re.findall(r"'(\w+)'", re.search(r'__all__ = \[(.*?)\]', src, re.S).group(1))
        nb = next((ROOT/'nbs').glob(f'{n:02d}_*.ipynb'))
        text = '\n'.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code')
        missing = [x for x in names if not re.search(rf'show_doc\({x}\b', text) and not x.isupper()]
        assert not missing, (m, missing)

def test_modules_define_every_name_they_use():
    "A generated module must not lean on a name its notebook's test cells imported (pyflakes: undefined names)"
    out = subprocess.run([sys.executable, '-m', 'pyflakes', *map(str, sorted((ROOT/'fastxtend_ema').glob('*.py')))],
                         capture_output=True, text=True).stdout
    undefined = [l for l in out.splitlines() if 'undefined name' in l]
    assert not undefined, undefined
