"""The docs site: nbdev-docs' configuration complete and in step with pyproject.toml, and, since Quarto cannot be
installed here, the notebooks rendered offline to HTML (nbconvert) with every figure and table they store."""
import json, re, shutil, subprocess, sys, tomllib
from pathlib import Path
import pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
sys.path.insert(0, str(ROOT/'tools'))
from run_nbs import notebooks

def _yml(name): return yaml.safe_load((NBS/name).read_text(encoding='utf-8'))
def _project(): return tomllib.loads((ROOT/'pyproject.toml').read_text(encoding='utf-8'))

def _entries(contents):
    "The files a sidebar lists, in order"
    for e in contents:
        if isinstance(e, str): yield e
        elif 'contents' in e: yield from _entries(e['contents'])
        else: yield e['href']

def test_description_and_repo_reach_nbdev_yml():
    proj, site = _project()['project'], _yml('nbdev.yml')['website']
    assert site['description'] == proj['description'] and proj['description']
    assert site['repo-url'] == proj['urls']['Repository'] == 'https://github.com/fastxtend-ema/fastxtend_ema'
    assert site['site-url'] == proj['urls']['Documentation'].rstrip('/')
    assert 'description' not in proj.get('dynamic', []) and not re.search(r'^description\s*=', (ROOT/'settings.ini').read_text(), re.M)

def test_index_states_the_same_description():
    cells = json.loads((NBS/'index.ipynb').read_text(encoding='utf-8'))['cells']
    title = next(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    assert title.splitlines()[1] == '> ' + _project()['project']['description']

def test_config_is_what_nbdev_docs_writes(tmp_path):
    "nbdev-docs regenerates nbdev.yml (and keeps our _quarto.yml and sidebar.yml): running its step changes nothing"
    shutil.copy(ROOT/'pyproject.toml', tmp_path)
    (tmp_path/'nbs').mkdir()
    for f in ('nbdev.yml', '_quarto.yml', 'sidebar.yml'): shutil.copy(NBS/f, tmp_path/'nbs'/f)
    code = 'from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar; refresh_quarto_yml(); nbdev_sidebar.__wrapped__()'
    subprocess.run([sys.executable, '-c', code], cwd=tmp_path, check=True, capture_output=True)
    for f in ('nbdev.yml', '_quarto.yml', 'sidebar.yml'):
        assert (tmp_path/'nbs'/f).read_text() == (NBS/f).read_text(), f

def test_sidebar_lists_every_notebook_once_in_reading_order():
    listed = list(_entries(_yml('sidebar.yml')['website']['sidebar']['contents']))
    have = [str(p.relative_to(NBS)) for p in notebooks()]
    assert len(listed) == len(set(listed)) and sorted(listed) == sorted(have), (listed, have)
    assert listed[0] == 'index.ipynb'
    tut = [i for i,e in enumerate(listed) if e.startswith('tutorials/')]
    mods = [i for i,e in enumerate(listed) if re.match(r'\d\d_', e)]
    assert max(tut) < min(mods), 'tutorials come before the reference'
    assert [listed[i] for i in mods] == sorted(listed[i] for i in mods), 'modules in dependency (file) order'

def test_quarto_yml_references_only_files_that_exist():
    q = _yml('_quarto.yml')
    def files(o):
        if isinstance(o, dict):
            for k,v in o.items():
                if k in ('css', 'metadata-files', 'include-in-header', 'include-before-body', 'include-after-body', 'logo', 'favicon'):
                    yield from ([v] if isinstance(v, str) else v)
                else: yield from files(v)
        elif isinstance(o, list):
            for v in o: yield from files(v)
    refs = list(files(q))
    assert 'nbdev.yml' in refs and 'sidebar.yml' in refs
    missing = [f for f in refs if not (NBS/f).exists()]
    assert not missing, missing

# -- the pages ------------------------------------------------------------------------------------------------------
# What a reader must find on each page, beyond "every stored figure and table": (figures, tables) at least
NEEDS = {'index.ipynb': (0, 1), '07_demo.ipynb': (1, 0), '08_posthoc.ipynb': (1, 0), '05_callback.ipynb': (1, 1), '09_bema.ipynb': (0, 1),
         'tutorials/ema_tutorial.ipynb': (3, 1), 'tutorials/posthoc.ipynb': (1, 1)}

def _stored(nb):
    "Stored figures (base64 PNG) and HTML tables of a notebook"
    imgs, tables = [], []
    for c in json.loads(nb.read_text(encoding='utf-8'))['cells']:
        for o in c.get('outputs', []):
            d = o.get('data', {})
            if 'image/png' in d: imgs.append(''.join(d['image/png']).replace('\n', ''))
            html = ''.join(d.get('text/html', ''))
            if '<table' in html: tables.append(html)
    return imgs, tables

@pytest.mark.parametrize('nb', notebooks(), ids=[str(p.relative_to(NBS)) for p in notebooks()])
def test_rendered_page_shows_every_figure_and_table(nb):
    from nbconvert import HTMLExporter
    import nbformat
    html, _ = HTMLExporter(template_name='lab').from_notebook_node(nbformat.read(nb, as_version=4))
    imgs, tables = _stored(nb)
    for png in imgs: assert f'data:image/png;base64,{png[:200]}' in html, f'{nb.name}: a stored figure is not on the page'
    for t in tables:
        head = re.search(r'<thead>(.*?)</thead>', t, re.S)
        cols = re.findall(r'<th[^>]*>(.*?)</th>', head.group(1) if head else t)
        assert cols and all(f'>{c}</th>' in html for c in cols), f'{nb.name}: a stored table is not on the page'
    n_img, n_tab = NEEDS.get(str(nb.relative_to(NBS)), (0, 0))
    assert len(imgs) >= n_img and len(tables) >= n_tab, f'{nb.name}: {len(imgs)} figures, {len(tables)} tables stored'
    assert html.count('data:image/png;base64,') >= len(imgs)
