"""Refresh the outputs stored in the notebooks: run each with execnb (nbdev's runner) and save what a reader sees.

    python tools/run_nbs.py                       # every notebook under nbs/
    python tools/run_nbs.py nbs/07_demo.ipynb     # some of them
    python tools/run_nbs.py --flags slow          # also run cells flagged `slow` (else their stored outputs stay)
    python tools/run_nbs.py --check               # run, save nothing, exit 1 if a stored output is missing or stale

Outputs are kept reviewable in a diff:
- fastai's progress bars become one final table per fit, without the time column (no live bars, no style blob);
- figures are PNGs at 80 dpi (a 6.4x4.8 figure is 512x384 pixels);
- warnings show as `Category: message`, without the file and line that raised them;
- no metadata, no execution counts;
- an output holding a memory address (`0x7f...`), an absolute path or a timestamp stops the refresh, naming the
  notebook and cell: print something a reader can use instead.
Cells that nbdev-test skips (`#| eval: false`, flags not asked for) are not run and keep what they store.
`tests/test_notebooks.py` runs every notebook through `check` below, so CI fails when a stripped or stale notebook
lands.
"""
import argparse, contextlib, json, os, re, subprocess, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
DPI = 80
FLAGS = ('slow', 'cuda', 'multicuda')   # skipped unless asked for, as nbdev-test does (pyproject's tst_flags)

def notebooks(paths=()) -> list:
    "The notebooks under nbs/ (or `paths`), in file order"
    if paths: return [Path(p).resolve() for p in paths]
    return sorted(p for p in NBS.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts and not p.name.startswith('_'))

def _rel(p: Path):
    "`p` relative to the repository, if it is inside"
    try: return p.relative_to(ROOT)
    except ValueError: return p

class OutputError(Exception): "An output a reader should not see (address, path, timestamp), or a failed cell"

# -- fastai's progress: one final table per fit -------------------------------------------------------------------
class FinalTable:
    "The table fastai's progress bar ends with, without the time column: HTML for the page, text for the README"
    def __init__(self, rows): self.rows = rows
    def _repr_html_(self):
        esc = lambda s: str(s).replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
        head = ''.join(f'<th>{esc(h)}</th>' for h in self.rows[0])
        body = ''.join('<tr>' + ''.join(f'<td>{esc(v)}</td>' for v in r) + '</tr>' for r in self.rows[1:])
        return f'<table class="dataframe fastprogress" border="1">\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>'
    def __repr__(self):
        w = [max(len(str(r[i])) for r in self.rows) for i in range(len(self.rows[0]))]
        return '\n'.join('  '.join(str(v).rjust(n) for v,n in zip(r, w)).rstrip() for r in self.rows)

def _bars():
    "Progress-bar classes that display nothing while running and the final table once, at the end of the fit"
    from fastprogress.fastprogress import ProgressBar, MasterBar
    class QuietBar(ProgressBar):
        def on_iter_begin(self): pass
        def on_interrupt(self): pass
        def on_iter_end(self): pass
        def on_update(self, val, text): pass
    class TableBar(MasterBar):
        pcls = QuietBar
        def __init__(self, gen, total=None, **kwargs):
            super().__init__(gen, QuietBar, total)
            self.lines,self.shown = [],False
        def write(self, line, table=False):
            if table: self.lines.append(list(line))
        def on_iter_end(self):
            if self.shown or not self.lines: return
            self.shown = True
            hdr = self.lines[0]
            keep = [i for i,h in enumerate(hdr) if h != 'time']
            from IPython.display import display
            display(FinalTable([[r[i] for i in keep if i < len(r)] for r in self.lines]))
    return QuietBar, TableBar

@contextlib.contextmanager
def reader_display():
    "Inside: fastai shows final progress tables, warnings show as `Category: message`. All put back on exit."
    import fastprogress.fastprogress as fp, fastai.callback.progress as fcp, matplotlib
    QuietBar, TableBar = _bars()
    mods = [(m, n, getattr(m, n)) for m in (fp, fcp) for n in ('master_bar', 'progress_bar')]
    backend, rc, fmt = matplotlib.get_backend(), matplotlib.rcParams.copy(), warnings.formatwarning
    try:
        for m in (fp, fcp): m.master_bar, m.progress_bar = TableBar, QuietBar
        warnings.formatwarning = lambda msg, cat, *args, **kwargs: f'{cat.__name__}: {msg}\n'   # no file, no line
        yield
    finally:
        for m, n, v in mods: setattr(m, n, v)
        warnings.formatwarning = fmt
        import matplotlib.pyplot as plt
        plt.close('all')
        with contextlib.suppress(Exception): plt.switch_backend(backend)
        with contextlib.suppress(Exception): matplotlib.rcParams.update(rc)
        from IPython.core.interactiveshell import InteractiveShell
        if InteractiveShell.initialized(): InteractiveShell.clear_instance()

# -- outputs a reader can review ------------------------------------------------------------------------------------
_ADDRESS = re.compile(r'\b0x[0-9a-fA-F]{6,}\b')
_GLOG = re.compile(r'[WIEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ')
_STAMP = re.compile(r'\b\d{4}-\d\d-\d\d[ T]\d\d:\d\d|\bTotal time\b')
def _paths():
    "Absolute paths of this machine that must not reach a stored output"
    import site, sysconfig, tempfile
    ps = {str(ROOT), str(Path.home()), tempfile.gettempdir(), sys.prefix, sys.base_prefix, sysconfig.get_paths()['purelib']}
    with contextlib.suppress(Exception): ps |= set(site.getsitepackages())
    return sorted((p for p in ps if p and len(p) > 1), key=len, reverse=True)

def _text(o) -> str:
    "The text of one output, images left out"
    if o['output_type'] == 'stream': return ''.join(o['text'])
    if o['output_type'] == 'error': return '\n'.join(o.get('traceback', []))
    return '\n'.join(''.join(v) if isinstance(v, list) else str(v) for k,v in o.get('data', {}).items() if not k.startswith('image/'))

def tidy(outputs: list, where: str) -> list:
    "`outputs` made reviewable, or `OutputError` naming `where` if one shows an address, a path or a time stamp"
    res = []
    for o in outputs:
        o = dict(o)
        if o['output_type'] == 'stream':   # torch's own log lines (glog format: level, date, time, pid) are not the cell's
            o['text'] = [l for l in ''.join(o['text']).splitlines(keepends=True) if not _GLOG.match(l)]
        if o['output_type'] == 'stream' and not ''.join(o['text']).strip(): continue
        if o['output_type'] in ('display_data', 'execute_result'):
            o['metadata'] = {}
            if o['output_type'] == 'execute_result': o['execution_count'] = None
            data = dict(o['data'])
            html = ''.join(data.get('text/html', '')).strip()
            if html.startswith('<style') and html.endswith('</style>'): continue   # fastprogress' style sheet alone
            o['data'] = data
        txt = _text(o)
        for what, bad in (('a memory address', _ADDRESS.search(txt)), ('a time stamp', _STAMP.search(txt)),
                          ('an absolute path', next((p for p in _paths() if p in txt), None))):
            if bad: raise OutputError(f'{where} shows {what} ({bad if isinstance(bad, str) else bad.group(0)!r}): '
                                      f'print something a reader can use instead.\n{txt[:600]}')
        res.append(o)
    return res

# -- running --------------------------------------------------------------------------------------------------------
def execute(nb_path, flags=()) -> dict:
    "Run the notebook at `nb_path` as nbdev-test does (`flags` forced); {cell index: tidy outputs} of the cells run"
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    nb_path = Path(nb_path).resolve()
    nb = NBProcessor(nb_path, rm_directives=False, process=True).nb
    skip = _skip_cell(nb, [f for f in FLAGS if f not in flags], list(flags))
    where = lambda c: f'{_rel(nb_path)} cell {c.idx_} ({c.get("id", "?")})'
    ran, prev = {}, os.environ.get('IN_TEST')
    os.environ['IN_TEST'] = '1'
    try:
        with reader_display(), working_directory(nb_path.parent):
            shell = CaptureShell(nb_path, mpl_format='png')
            shell.run(f"import matplotlib; matplotlib.rcParams['figure.dpi'] = {DPI}")
            try:
                for c in nb.cells:
                    if skip(c): continue
                    outs = shell.run(c.source, timeout=600)
                    if shell.exc is not None:
                        raise OutputError(f'{where(c)} failed:\n' + _text(next((o for o in outs if o['output_type'] == 'error'), {'output_type': 'stream', 'text': [repr(shell.exc)]})))
                    ran[c.idx_] = tidy([dict(o) for o in outs], where(c))
            finally:
                shell.close()
                # compiled code keeps guards on the shell's namespace: drop them now, or torch prints a KeyError at exit
                if 'torch._dynamo' in sys.modules: sys.modules['torch._dynamo'].reset()
    finally:
        if prev is None: os.environ.pop('IN_TEST', None)
        else: os.environ['IN_TEST'] = prev
    return ran

def _plain(o):
    "An output as plain JSON-able dicts and lists"
    if isinstance(o, dict): return {k: _plain(v) for k,v in o.items()}
    if isinstance(o, (list, tuple)): return [_plain(v) for v in o]
    return o

def _kinds(outputs) -> set:
    "What a list of outputs shows: stream, image, html, text"
    ks = set()
    for o in outputs:
        if o['output_type'] == 'stream': ks.add(o.get('name', 'stdout'))
        else: ks |= {'image' if k.startswith('image/') else 'html' if k == 'text/html' else 'text' for k in o.get('data', {})}
    return ks

def compare(nb_path, ran: dict) -> list:
    "Problems of the outputs stored in `nb_path` against those of a run (`execute`): missing, stale or of another kind"
    cells = json.loads(Path(nb_path).read_text(encoding='utf-8'))['cells']
    probs = []
    for i, outs in ran.items():
        stored, cid = cells[i].get('outputs', []), cells[i].get('id', '?')
        if outs and not stored: probs.append(f'cell {i} ({cid}) shows {sorted(_kinds(outs))} but stores no output')
        elif stored and not outs: probs.append(f'cell {i} ({cid}) stores an output but shows nothing now')
        elif _kinds(outs) != _kinds(stored):
            probs.append(f'cell {i} ({cid}) shows {sorted(_kinds(outs))} but stores {sorted(_kinds(stored))}')
    return probs

def save(nb_path, ran: dict):
    "Store the outputs of a run in the notebook at `nb_path` (cells not run keep theirs)"
    p = Path(nb_path)
    nb = json.loads(p.read_text(encoding='utf-8'))
    for i, outs in ran.items():
        c = nb['cells'][i]
        c['outputs'], c['execution_count'] = _plain(outs), None
    p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('paths', nargs='*', help='notebooks (default: all under nbs/)')
    ap.add_argument('--flags', nargs='*', default=[], choices=FLAGS, help='also run cells with these flags')
    ap.add_argument('--check', action='store_true', help='save nothing; exit 1 if a stored output is missing or stale')
    a = ap.parse_args(argv)
    bad = 0
    for nb in notebooks(a.paths):
        t0 = time.time()
        try: ran = execute(nb, a.flags)
        except OutputError as e:
            print(f'FAIL {e}', file=sys.stderr); bad += 1; continue
        rel = _rel(nb)
        if a.check:
            probs = compare(nb, ran)
            for pr in probs: print(f'{rel}: {pr}', file=sys.stderr)
            bad += bool(probs)
        else:
            save(nb, ran)
        print(f'{rel}: {sum(map(bool, ran.values()))} cells with output, {time.time()-t0:.0f} s')
    if not a.check and not bad: subprocess.run(['nbdev-clean'], cwd=ROOT, check=True)
    if bad: print(f'{bad} notebook(s) failed' + (': run python tools/run_nbs.py and commit' if a.check else ''), file=sys.stderr)
    return int(bool(bad))

if __name__ == '__main__': sys.exit(main())
