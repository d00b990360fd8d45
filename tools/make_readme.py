"""Write README.md from nbs/index.ipynb, offline (nbdev-readme needs Quarto, which cannot be installed here).

Markdown cells are copied; code cells become ```python blocks; cells marked `#| hide` and nbdev directive lines are
left out; saved text outputs (if any) follow their cell. Links are written in the notebook as the docs site needs them
(relative to nbs/, or the repository's URL for a file outside nbs/) and become paths from the repository's root here,
so that both the site and the README on GitHub resolve them. `python tools/make_readme.py --check` exits 1 when README.md
is out of step with the notebook (the test suite runs this check).
"""
import argparse, json, posixpath, re, sys, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_directive = re.compile(r'^\s*#\s*\|\s*(\S+)')

def _src(cell): return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']

def _split(src):
    "Directives (first lines starting with `#|`) and the rest of a cell"
    lines = src.splitlines()
    dirs = []
    while lines and _directive.match(lines[0]): dirs.append(_directive.match(lines.pop(0)).group(1)); 
    return dirs, '\n'.join(lines).strip('\n')

def _outputs(cell):
    out = []
    for o in cell.get('outputs', []):
        txt = o.get('text') or o.get('data', {}).get('text/plain')
        if txt: out.append(''.join(txt).rstrip('\n'))
    return out

_link = re.compile(r'(\]\()([^)\s]+)(\))')   # the target of a markdown link or image: ](target)

def repo_url() -> str:
    "The repository's URL, from pyproject.toml"
    return tomllib.loads((Path(__file__).resolve().parents[1]/'pyproject.toml').read_text(encoding='utf-8'))['project']['urls']['Repository']

def readme_link(target:str, repo:str) -> str:
    "`target` of a link in nbs/index.ipynb, as README.md (at the repository's root) needs it"
    for base in (f'{repo}/blob/main/', f'{repo}/tree/main/'):
        if target.startswith(base): return target[len(base):]
    if re.match(r'[A-Za-z][\w+.-]*:|[#/]', target): return target   # another site, an anchor of this page
    path, hash, anchor = target.partition('#')
    return posixpath.normpath(posixpath.join('nbs', path)) + hash + anchor

def render(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    "README text for the notebook at `nb_path`"
    nb = json.loads(Path(nb_path).read_text(encoding='utf-8'))
    parts, repo = [], repo_url()
    for cell in nb['cells']:
        dirs, body = _split(_src(cell))
        if 'hide' in dirs or 'default_exp' in dirs or not body: continue
        if cell['cell_type'] == 'markdown': parts.append(_link.sub(lambda m: m[1] + readme_link(m[2], repo) + m[3], body))
        elif cell['cell_type'] == 'code':
            parts.append(f'```python\n{body}\n```')
            parts += [f'```\n{o}\n```' for o in _outputs(cell)]
    header = '<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->'
    return header + '\n\n' + '\n\n'.join(parts) + '\n'

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--check', action='store_true', help='exit 1 if README.md differs from what the notebook gives')
    a = p.parse_args(argv)
    want, readme = render(), ROOT/'README.md'
    if a.check:
        if not readme.exists() or readme.read_text(encoding='utf-8') != want:
            print('README.md is out of step with nbs/index.ipynb: run python tools/make_readme.py', file=sys.stderr)
            return 1
        return 0
    readme.write_text(want, encoding='utf-8')
    return 0

if __name__ == '__main__': sys.exit(main())
