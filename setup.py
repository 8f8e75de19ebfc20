"""Builds the Cython twins in ``_speedups/`` into ``engine._compiled`` (see engine.speedups).

Metadata lives in pyproject.toml; this file only declares the extensions. Cythonizing happens
lazily inside build_ext, as in httptools. A failed build is not fatal: the install goes on and
engine.speedups falls back to the pure-Python twins.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "cdivision": True,
    "embedsignature": True,
}

EXTENSIONS = [
    Extension("engine._compiled.reader", sources=["_speedups/reader.pyx"]),
    Extension("engine._compiled.scheduler", sources=["_speedups/scheduler.pyx"]),
    Extension("engine._compiled.grammar", sources=["_speedups/grammar.pyx"]),
]


def _warn(message: str) -> None:
    print(f"WARNING: {message}; the pure-Python twins will be used", file=sys.stderr)


class tern_build_ext(build_ext):
    """build_ext that cythonizes on demand and treats a failed build as optional."""

    user_options = build_ext.user_options + [
        ("cython-annotate", None, "write an annotated HTML next to each .pyx"),
        ("cython-directives=", None, "extra Cython directives: name=value,..."),
    ]
    boolean_options = build_ext.boolean_options + ["cython-annotate"]

    def initialize_options(self):
        super().initialize_options()
        self.cython_annotate = None
        self.cython_directives = None

    def finalize_options(self):
        # Cythonize here, before setuptools decorates the Extension objects it will build.
        # Once done, the sources are .c files and _cythonize has nothing left to do.
        try:
            self._cythonize()
        except Exception as exc:  # no Cython, or a .pyx that does not translate
            _warn(f"cythonizing the speedups failed ({exc})")
            self.distribution.ext_modules[:] = []
        super().finalize_options()

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, a compile or link error: all optional
            _warn(f"building the compiled speedups failed ({exc})")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            _warn(f"building {ext.name} failed ({exc})")

    def _cythonize(self):
        extensions = self.distribution.ext_modules
        if not any(src.endswith(".pyx") for ext in extensions for src in ext.sources):
            return
        from Cython.Build import cythonize

        directives = dict(CYTHON_DIRECTIVES)
        for item in filter(None, (self.cython_directives or "").split(",")):
            name, _, value = item.partition("=")
            directives[name.strip()] = {"true": True, "false": False}.get(value.lower(), value)
        extensions[:] = cythonize(
            extensions,
            compiler_directives=directives,
            annotate=bool(self.cython_annotate),
            force=bool(self.cython_annotate),  # an up-to-date .c would skip the annotation
            quiet=True,
        )


setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": tern_build_ext})
