"""The benchmark suite (pytest-benchmark): `pytest benches/ --benchmark-only` measures,
plain `pytest` runs every bench once at tiny sizes (the smoke mode, see conftest.py).

This folder is a package on purpose. tests/ has no __init__.py and its files do
`from conftest import ...`; a second top-level `conftest` module (benches/conftest.py imported
by its basename) would replace tests/conftest.py in sys.modules and break their imports, and
bench files named like test files (tests/test_fingerprint.py) would collide the same way. As a
package, its modules import as `benches.conftest`, `benches.test_bench_fingerprint`, ...
"""
