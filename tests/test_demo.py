"""`python -m fastxtend_ema.demo`, the README's command, run as a user runs it: it shows fastai's progress tables,
prints the table of final scores recorded in nbs/03_demo.ipynb, and writes its PNG.

The printed table is checked twice: against fastai's own progress tables in the same output (the numbers come from
the `Recorder`), and against the table recorded in the notebook's prose (the numbers the notebook reports are the
ones the demo prints). Floating-point results depend on the thread count, so the demo runs with 2 threads, as when
the notebook's numbers were measured.
"""
import json, os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r'^\s*(\d+)\s+([0-9.]+(?:\s+[0-9.]+)+)\s+\d\d:\d\d\s*$')   # a row of fastai's progress table
NAMES = ('run without EMA', 'EMA run, training weights', 'EMA run, EMA weights')


def _demo(tmp_path, *args):
    env = {**os.environ, 'OMP_NUM_THREADS': '2', 'MPLBACKEND': 'Agg'}
    out = subprocess.run([sys.executable, '-m', 'fastxtend_ema.demo', *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _final_table(text):
    "{name: (loss, accuracy)} from the demo's table of final scores"
    rows = {}
    for line in text.splitlines():
        for n in NAMES:
            if line.startswith(n):
                loss, acc = line[len(n):].split()
                rows[n] = (loss, acc)
    assert list(rows) == list(NAMES), text[-2000:]
    return rows


def _progress_rows(text):
    "The rows of fastai's progress tables, as lists of numbers, in printed order"
    # fastprogress writes bars with carriage returns; the table rows end each printed line
    lines = [l.split('\r')[-1].split('█')[-1] for l in text.splitlines()]
    return [[float(v) for v in m.group(2).split()] for l in lines if (m := ROW.match(l))]


def _recorded_table():
    "The table of final scores quoted in the notebook's prose"
    nb = json.loads((ROOT/'nbs'/'03_demo.ipynb').read_text())
    prose = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown' and '## What it shows' in ''.join(c['source']))
    return _final_table(prose.split('```')[1])


def test_help():
    out = subprocess.run([sys.executable, '-m', 'fastxtend_ema.demo', '--help'], capture_output=True, text=True, check=True).stdout
    for arg in ('--epochs', '--lr', '--bs', '--seed', '--start-decay', '--final-decay', '--finish', '--out', '--quiet'): assert arg in out, arg


def test_readme_command(tmp_path):
    "No arguments: the defaults, the progress tables, the recorded numbers, ./ema_demo.png"
    text = _demo(tmp_path)
    table = _final_table(text)
    assert 'training weights of the two runs: bit-identical' in text
    # fastai's progress tables: 8 rows without EMA (train, valid loss, accuracy), then 8 with EMA columns too
    rows = _progress_rows(text)
    assert [len(r) for r in rows] == [3]*8 + [5]*8, rows
    plain, ema = rows[7], rows[15]
    fmt = lambda l, a: (f'{l:.4f}', f'{a:.4f}')
    assert table['run without EMA'] == fmt(plain[1], plain[2])
    assert table['EMA run, training weights'] == fmt(ema[1], ema[2])
    assert table['EMA run, EMA weights'] == fmt(ema[3], ema[4])
    assert table == _recorded_table(), (table, _recorded_table())
    png = tmp_path/'ema_demo.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 20_000


def test_short_run_quiet_with_out(tmp_path):
    text = _demo(tmp_path, '--epochs', '2', '--quiet', '--out', 'sub.png')
    assert 'epoch' not in text and not _progress_rows(text)   # quiet: no progress tables
    table = _final_table(text)
    assert table['run without EMA'] == table['EMA run, training weights']
    assert (tmp_path/'sub.png').stat().st_size > 20_000 and not (tmp_path/'ema_demo.png').exists()
