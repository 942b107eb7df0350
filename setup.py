"""Builds the optional C++ kernels (llamalite.kernels._cpu) at install time; everything else is in
pyproject.toml. Without a compiler or torch at build time, llamalite installs without them and
runs its pure-PyTorch path (it says so once)."""

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension("llamalite.kernels._cpu", ["llamalite/kernels/cpu.cpp"],
                                extra_compile_args=["-O3", "-fno-math-errno", "-fopenmp"],
                                extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}
except ImportError:  # pragma: no cover - torch absent at build time
    pass

setup(ext_modules=ext_modules, cmdclass=cmdclass)
