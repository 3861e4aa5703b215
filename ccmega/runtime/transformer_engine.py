"""Transformer Engine, checked the way megatron uses it: by importing it and reading its version.

A package that is installed but does not import (a CUDA library missing on the node, the empty
`transformer-engine` meta-package) counts as broken, not present; each FP8 recipe needs a minimum
version, refused here with that version instead of failing inside megatron at the first FP8 layer.
Without CUDA nothing is imported: a CPU process never needs TE, and importing it there can fail hard.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass

import torch
from packaging.version import InvalidVersion, Version

# The version megatron-core's fp8_utils.get_fp8_recipe needs to build each `precision.fp8_recipe`
# (the same in 0.16.1 and 0.19.2): Float8CurrentScaling from TE 2.2.0.dev0, Float8BlockScaling from
# 2.3.0.dev0, MXFP8BlockScaling from 2.1.0; delayed scaling is built by every TE version.
FP8_RECIPE_MIN_VERSION: dict[str, str | None] = {
    "delayed": None,
    "mxfp8": "2.1.0",
    "tensorwise": "2.2.0.dev0",
    "blockwise": "2.3.0.dev0",
}


@dataclass(frozen=True)
class Status:
    version: str | None  # set when transformer_engine (and its PyTorch part) imports
    problem: str | None  # otherwise why not: "not installed", "installed but broken: <error>"


@functools.cache
def status() -> Status:
    """Imports transformer_engine and transformer_engine.pytorch (what megatron's TE spec uses), once."""
    try:
        te = importlib.import_module("transformer_engine")
    except ModuleNotFoundError as e:
        if e.name == "transformer_engine":
            return Status(None, "not installed")
        return Status(None, f"installed but broken: {_describe(e)}")
    except Exception as e:  # noqa: BLE001 (a broken install raises anything: OSError, RuntimeError, ...)
        return Status(None, f"installed but broken: {_describe(e)}")
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # noqa: BLE001
        return Status(None, f"installed but broken: transformer_engine.pytorch: {_describe(e)}")
    version = getattr(te, "__version__", None) or _distribution_version()
    if version is None:
        return Status(None, "installed but broken: no version (neither __version__ nor package metadata)")
    try:
        Version(str(version))
    except InvalidVersion:
        return Status(None, f"installed but broken: unreadable version {version!r}")
    return Status(str(version), None)


def _describe(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__


def _distribution_version() -> str | None:
    """The installed distribution's version, read from its metadata without importing it."""
    for name in ("transformer-engine", "transformer_engine"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def available() -> bool:
    """CUDA and an importable TE: megatron's Transformer Engine layer spec can be used."""
    if not torch.cuda.is_available():
        return False
    problem = status().problem
    if problem and problem != "not installed":
        _warn_once(f"Transformer Engine is {problem}: using megatron's local layer spec (no TE kernels, no FP8)")
    return problem is None


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def fp8_problem(fp8: str, recipe: str) -> str | None:
    """Why `--fp8 FP8 --fp8-recipe RECIPE` cannot run in this process, or None."""
    if recipe not in FP8_RECIPE_MIN_VERSION:
        return f"precision.fp8_recipe must be one of {', '.join(FP8_RECIPE_MIN_VERSION)}, not {recipe!r}"
    if not torch.cuda.is_available():
        return (f"--fp8 {fp8} needs NVIDIA Transformer Engine on a CUDA GPU (CUDA available: False, "
                f"transformer_engine installed: {_distribution_version() is not None}); drop --fp8 "
                "or run on a GPU node with Transformer Engine")
    te = status()
    if te.problem:
        return (f"--fp8 {fp8} needs NVIDIA Transformer Engine on a CUDA GPU (CUDA available: True, "
                f"transformer_engine: {te.problem}); drop --fp8 or fix the Transformer Engine install")
    return recipe_problem(recipe, te.version)


def recipe_problem(recipe: str, version: str) -> str | None:
    """Why TE `version` cannot run FP8 recipe `recipe` under megatron-core, or None."""
    needed = FP8_RECIPE_MIN_VERSION[recipe]
    if needed is None or Version(version) >= Version(needed):
        return None
    usable = [r for r, v in FP8_RECIPE_MIN_VERSION.items() if v is None or Version(version) >= Version(v)]
    return (f"FP8 recipe {recipe} needs Transformer Engine >= {Version(needed).base_version} (megatron-core's "
            f"get_fp8_recipe), found {version}; use --fp8-recipe {' or '.join(usable)}, or a newer Transformer Engine")
