"""Every notebook in nbs/ executed with the runner that refreshes their outputs (`tools/run_nbs.py`, execnb as in
nbdev-test), one pytest test each; each checks that the notebook stores the outputs a reader should see."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import run_nbs

NBS = ROOT/'nbs'
NOTEBOOKS = run_nbs.notebooks()
# Cells flagged `slow` or `cuda` are skipped unless named in FASTXTEND_EMA_TEST_FLAGS (e.g. "slow cuda").
FORCE = [f for f in os.environ.get('FASTXTEND_EMA_TEST_FLAGS', '').split() if f in run_nbs.FLAGS]

def test_found_notebooks():
    names = {str(p.relative_to(NBS)) for p in NOTEBOOKS}
    assert {'index.ipynb', '00_update.ipynb', '01_averager.ipynb', '02_decay.ipynb', '05_callback.ipynb', '08_posthoc.ipynb',
            '09_bema.ipynb', '97_test_utils.ipynb', 'tutorials/ema_tutorial.ipynb', 'tutorials/posthoc.ipynb'} <= names, names

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[str(p.relative_to(NBS)) for p in NOTEBOOKS])
def test_notebook(nb):
    "The notebook runs, and every cell that shows something stores it (missing, stale or other-kind outputs fail)"
    try: ran = run_nbs.execute(nb, FORCE)
    except run_nbs.OutputError as e: pytest.fail(str(e), pytrace=False)
    probs = run_nbs.compare(nb, ran)
    assert not probs, f'{nb.name}: run python tools/run_nbs.py {nb.relative_to(ROOT)} and commit:\n' + '\n'.join(probs)

def test_refresh_command_checks_outputs(tmp_path):
    "`python tools/run_nbs.py --check` passes on a committed notebook and fails on a stripped copy of it"
    cmd = [sys.executable, str(ROOT/'tools'/'run_nbs.py'), '--check']
    ok = subprocess.run(cmd + [str(NBS/'02_decay.ipynb')], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert ok.returncode == 0, ok.stderr
    nb = json.loads((NBS/'02_decay.ipynb').read_text(encoding='utf-8'))
    for c in nb['cells']:
        if c['cell_type'] == 'code': c['outputs'] = []
    stripped = tmp_path/'02_decay.ipynb'
    stripped.write_text(json.dumps(nb))
    bad = subprocess.run(cmd + [str(stripped)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert bad.returncode == 1 and 'stores no output' in bad.stderr, bad.stderr

def test_stored_outputs_are_reviewable():
    "What the notebooks store has no memory address, path or time stamp, no live progress bar, and small figures"
    n_img = 0
    for nb in NOTEBOOKS:
        for i, c in enumerate(json.loads(nb.read_text(encoding='utf-8'))['cells']):
            outs = c.get('outputs', [])
            if not outs: continue
            where = f'{nb.relative_to(ROOT)} cell {i}'
            run_nbs.tidy(outs, where)   # raises on an address, an absolute path or a time stamp
            for o in outs:
                html = ''.join(o.get('data', {}).get('text/html', ''))
                assert '<progress' not in html, f'{where}: a live progress bar'
                png = o.get('data', {}).get('image/png')
                if png:
                    n_img += 1
                    assert len(''.join(png))*3/4 < 150_000, f'{where}: a PNG of {len("".join(png))*3//4:,} bytes'
    assert n_img >= 5, n_img   # the tutorials' and the demo's figures are stored

def test_compare_finds_missing_and_stale_outputs(tmp_path):
    "The check above can fail: an output missing, an output left from an earlier run, an image that became text"
    nb = tmp_path/'x.ipynb'
    cell = lambda outs: dict(cell_type='code', id='a', metadata={}, source='1', execution_count=None, outputs=outs)
    text = [dict(output_type='execute_result', data={'text/plain': ['1']}, metadata={}, execution_count=None)]
    image = [dict(output_type='display_data', data={'image/png': 'iVBOR', 'text/plain': ['<Figure>']}, metadata={})]
    nb.write_text(json.dumps(dict(cells=[cell([]), cell(text), cell(text)], metadata={}, nbformat=4, nbformat_minor=5)))
    probs = run_nbs.compare(nb, {0: text, 1: [], 2: image})
    assert len(probs) == 3 and 'stores no output' in probs[0] and 'shows nothing now' in probs[1] and 'image' in probs[2], probs
    assert run_nbs.compare(nb, {1: text, 2: text}) == []

def test_tidy_refuses_what_a_diff_cannot_review():
    out = lambda s: [dict(output_type='stream', name='stdout', text=[s])]
    for bad in ('<Learner object at 0x7f3a2b1c9d80>', f'saved to {ROOT}/models/x.pth', 'run at 2026-11-27 10:02:11'):
        with pytest.raises(run_nbs.OutputError): run_nbs.tidy(out(bad), 'here')
    assert run_nbs.tidy(out('valid_loss 0.0312'), 'here') == out('valid_loss 0.0312')

def test_progress_becomes_one_final_table_without_time(capsys):
    "Inside the runner a fastai fit shows one table, no time column; outside, fastai's own bars are back"
    import fastai.callback.progress as fcp
    from fastxtend_ema.test_utils import synth_learner
    before = fcp.master_bar, fcp.progress_bar
    learn = synth_learner()
    capsys.readouterr()
    with run_nbs.reader_display(): learn.fit(2, 1e-2)
    out = capsys.readouterr().out.splitlines()   # outside IPython, `display` prints the text form
    assert out[0].split() == ['epoch', 'train_loss', 'valid_loss'] and [l.split()[0] for l in out[1:]] == ['0', '1'], out
    assert (fcp.master_bar, fcp.progress_bar) == before
    t = run_nbs.FinalTable([['epoch', 'valid_loss'], ['0', '0.25']])
    assert '<th>valid_loss</th>' in t._repr_html_() and repr(t).splitlines() == ['epoch  valid_loss', '    0        0.25']
