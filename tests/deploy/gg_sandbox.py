"""A stand-in for the Greengrass v2 nucleus's file layout and recipe variables, to run lifecycle scripts.

As the nucleus lays a component out under its root (``/greengrass/v2``): artifacts in
``packages/artifacts/<name>/<version>/``, a ZIP artifact also unpacked into
``packages/artifacts-unarchived/<name>/<version>/<zip name without .zip>/``, and a work folder
``work/<name>/`` that is the scripts' working directory. Scripts run with ``sh -c`` after the recipe
variables are substituted; a variable this sandbox does not know (a typo, an unsupported one) fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_VAR = re.compile(r"\{([A-Za-z0-9_.-]+:)?(artifacts:path|artifacts:decompressedPath|work:path|"
                  r"configuration:/[^}]*|iot:thingName|kernel:rootPath)\}")  # fmt: skip
_ANY_VAR = re.compile(r"\{[A-Za-z0-9_.:/-]+\}")


@dataclass
class Component:
    recipe: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.recipe["ComponentName"])

    @property
    def version(self) -> str:
        return str(self.recipe["ComponentVersion"])


class Nucleus:
    """Components installed under ``root``, their variables, and their lifecycle steps run."""

    def __init__(self, root: Path, thing_name: str) -> None:
        self.root = root
        self.thing = thing_name
        self.components: dict[str, Component] = {}

    def artifacts(self, name: str) -> Path:
        return self.root / "packages" / "artifacts" / name / self.components[name].version

    def unarchived(self, name: str) -> Path:
        return self.root / "packages" / "artifacts-unarchived" / name / self.components[name].version

    def work(self, name: str) -> Path:
        return self.root / "work" / name

    def install(self, recipe_path: Path, files: dict[str, Path], merge: dict[str, Any] | None = None) -> None:
        """Lay out the recipe's artifacts (``files``: artifact file name -> local file) and its configuration
        (DefaultConfiguration, then a deployment's ``merge``); a recipe artifact without a file fails."""
        recipe = yaml.safe_load(recipe_path.read_text())
        cfg = json.loads(json.dumps(recipe.get("ComponentConfiguration", {}).get("DefaultConfiguration", {})))
        cfg.update(merge or {})
        comp = Component(recipe, cfg)
        self.components[comp.name] = comp
        for art in recipe["Manifests"][0].get("Artifacts", []):
            fname = art["URI"].rsplit("/", 1)[1]
            assert fname in files, f"{comp.name}: no file for artifact {fname}"
            dest = self.artifacts(comp.name) / fname
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[fname], dest)
            if art.get("Unarchive") == "ZIP":
                with zipfile.ZipFile(dest) as z:
                    z.extractall(self.unarchived(comp.name) / Path(fname).stem)
        self.work(comp.name).mkdir(parents=True, exist_ok=True)

    def substitute(self, name: str, script: str) -> str:
        """The script with every recipe variable replaced, as the nucleus would."""
        comp = self.components[name]

        def one(m: re.Match[str]) -> str:
            owner = (m.group(1) or "").rstrip(":") or name
            var = m.group(2)
            if owner not in self.components:
                raise AssertionError(f"{name}: variable of unknown component {owner!r}: {m.group(0)}")
            if owner != name and owner not in comp.recipe.get("ComponentDependencies", {}):
                raise AssertionError(f"{name}: {m.group(0)} names a component it does not depend on")
            if var == "artifacts:path":
                return str(self.artifacts(owner))
            if var == "artifacts:decompressedPath":
                return str(self.unarchived(owner))
            if var == "work:path":
                return str(self.work(owner))
            if var == "iot:thingName":
                return self.thing
            if var == "kernel:rootPath":
                return str(self.root)
            node: Any = self.components[owner].config
            for part in var.removeprefix("configuration:/").split("/"):
                if not isinstance(node, dict) or part not in node:
                    raise AssertionError(f"{name}: {m.group(0)} is not in the component's configuration")
                node = node[part]
            return node if isinstance(node, str) else json.dumps(node)

        out = _VAR.sub(one, script)
        left = _ANY_VAR.findall(out)
        assert not left, f"{name}: unknown recipe variables {left}"
        return out

    def script(self, name: str, step: str) -> str:
        life = self.components[name].recipe["Manifests"][0]["Lifecycle"]
        entry = life[step]
        return self.substitute(name, entry["Script"] if isinstance(entry, dict) else entry)

    def popen(self, name: str, step: str, env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start one lifecycle step as the nucleus does: ``sh -c``, in the component's work folder."""
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work(name)),
                "AWS_IOT_THING_NAME": self.thing, "SVCUID": "sandbox"}  # fmt: skip
        return subprocess.Popen(["sh", "-c", self.script(name, step)], cwd=self.work(name),
                                env={**base, **(env or {})}, **kw)  # fmt: skip

    def run(self, name: str, step: str, timeout_s: float, env: dict[str, str] | None = None) -> None:
        """Run a step to completion; AssertionError with its output when it fails."""
        p = self.popen(name, step, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = p.communicate(timeout=timeout_s)
        tail = out.decode(errors="replace")[-3000:]
        assert p.returncode == 0, f"{name} {step} exited {p.returncode}:\n{tail}"
