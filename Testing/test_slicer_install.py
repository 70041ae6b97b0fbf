"""The extension as CMake installs it: module files + the bundled kprism, with nothing from pip.

The install layout is built from the CMake files themselves (their file lists and kprism's glob),
then imported in a fresh Python that sees slicer-core and the runtime dependencies but not the
repository's kprism, and runs a real segmentation. Also: the dependency installer's routes (with
Slicer's installers replaced by recorders), the catalog entry, the derived packaging files, batch.py's
exits.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import types
from importlib.metadata import version
from pathlib import Path

import pytest
from slicer_fixture import SLICER_MODULE_DIR

ROOT = SLICER_MODULE_DIR.parent
MODULE_CMAKE = SLICER_MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
OPTIONAL_IMPORTS = ("monai", "yaml", "matplotlib")  # the train/eval extras: inference must not need them
sys.path.insert(0, str(ROOT / "Utilities"))
import sync_packaging  # noqa: E402

# ----------------------------------------------------------------------------------------------- CMake → layout


def _cmake_calls(text: str, command: str) -> list[list[str]]:
    """Arguments of every `command(...)` call: quoted arguments unquoted and unescaped, comments dropped."""
    calls = []
    for start in re.finditer(rf"^[ \t]*{command}[ \t]*\(", text, re.MULTILINE | re.IGNORECASE):
        arguments, position = [], start.end()
        while True:
            token = re.compile(r'\s+|#[^\n]*|"((?:\\.|[^"\\])*)"|\)|[^\s()#"]+').match(text, position)
            position = token.end()
            if token.group() == ")":
                break
            if token.group(1) is not None:
                arguments.append(re.sub(r"\\(.)", r"\1", token.group(1)))
            elif not token.group().isspace() and not token.group().startswith("#"):
                arguments.append(token.group())
        calls.append(arguments)
    return calls


def _expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], value)


def module_variables() -> dict[str, str]:
    """CMake variables of the module file, with the build tree's qt-scripted-modules as the layout's root."""
    variables = {"CMAKE_CURRENT_SOURCE_DIR": str(SLICER_MODULE_DIR), "CMAKE_BINARY_DIR": "",
                 "Slicer_QTSCRIPTEDMODULES_LIB_DIR": "", "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR": ""}
    for name, *values in _cmake_calls(MODULE_CMAKE.read_text(encoding="utf-8"), "set"):
        variables[name] = " ".join(_expand(v, variables) for v in values)
    return variables


def kprism_package_files() -> tuple[Path, list[str]]:
    """kprism's folder and its files as the module's file(GLOB_RECURSE …) and list(FILTER …) select them."""
    text, variables = MODULE_CMAKE.read_text(encoding="utf-8"), module_variables()
    glob_call = next(c for c in _cmake_calls(text, "file") if c[:2] == ["GLOB_RECURSE", "KPRISM_PACKAGE_FILES"])
    base = Path(_expand(glob_call[glob_call.index("RELATIVE") + 1], variables)).resolve()
    patterns = [_expand(p, variables) for p in glob_call[glob_call.index("RELATIVE") + 2:] if p != "CONFIGURE_DEPENDS"]
    found = set()
    for pattern in patterns:  # GLOB_RECURSE: the name pattern, in the pattern's folder and every folder below
        folder, name = Path(pattern).resolve().parent, Path(pattern).name
        found |= {str(p.relative_to(base)) for p in folder.rglob("*") if p.is_file() and fnmatch.fnmatchcase(p.name, name)}
    for call in _cmake_calls(text, "list"):
        if call[:3] == ["FILTER", "KPRISM_PACKAGE_FILES", "EXCLUDE"]:
            found = {f for f in found if not re.search(call[4], f)}
    return base, sorted(found)


def install_layout(root: Path) -> Path:
    """Copy what the two CMake files install into root/qt-scripted-modules; returns that folder."""
    text, variables = MODULE_CMAKE.read_text(encoding="utf-8"), module_variables()
    target = root / "qt-scripted-modules"
    listed = variables["MODULE_PYTHON_SCRIPTS"].split() + variables["MODULE_PYTHON_RESOURCES"].split()
    copies = [(SLICER_MODULE_DIR / name, target / name) for name in listed]  # ctkMacroCompilePythonScript keeps paths
    for source, destination, *_ in _cmake_calls(text, "configure_file"):
        if "${_file}" not in source:  # a file configured outside the module macro
            copies.append((SLICER_MODULE_DIR / source, target / _expand(destination, variables).lstrip("/")))
    base, files = kprism_package_files()
    destination = next(c[1] for c in _cmake_calls(text, "configure_file") if "${_file}" in c[0])
    prefix = _expand(destination.replace("${_file}", ""), variables).strip("/")
    copies += [(base / name, target / prefix / name) for name in files]
    for source, destination in copies:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    return target


def isolated_python(script: str, *, timeout: int = 240) -> subprocess.CompletedProcess:
    """A Python without site processing: the venv's site-packages as a plain path, so the editable kprism
    (a .pth import hook) stays hidden, and the train/eval extras blocked."""
    sites = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    prelude = (
        "import importlib.abc, sys\n"
        f"sys.path += {sites!r}\n"
        f"BLOCKED = {OPTIONAL_IMPORTS!r}\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'{name} is an optional dependency', name=name)\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('kprism') is None, 'the repository kprism is visible'\n"
    )
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + script], capture_output=True,
                          encoding="utf-8", env=env, timeout=timeout)


LOADED_DISTRIBUTIONS = """
def loaded_distributions():
    import importlib.metadata
    owners = importlib.metadata.packages_distributions()
    names = {dist for module in list(sys.modules) for dist in owners.get(module.split(".")[0], [])}
    return sorted(name.lower().replace("_", "-") for name in names)
"""
SLICERS_OWN = {"slicer-core", "vtk"}  # the application itself (slicer-core stands in for it here)


def runtime_closure() -> set[str]:
    """The distributions pyproject's runtime dependencies bring, transitively (markers evaluated, no extras)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "KPrismCore" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    todo, seen = [Requirement(d) for d in project["dependencies"]], set()
    while todo:
        requirement = todo.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(line) for line in requires(name) or []]
        except PackageNotFoundError:
            pass
    return seen


def test_the_installed_extension_segments_with_its_bundled_kprism_and_no_pip_package(tmp_path):
    modules = install_layout(tmp_path)
    script = f"""
sys.path.insert(0, {str(modules)!r})  # Slicer puts qt-scripted-modules on sys.path
import torch; torch.set_num_threads(1)
from KPrismSlicerLib import batch, install, nodes
from KPrismSlicerLib.logic import KPrismLogic
import kprism, kprism.weights
from kprism.data.interaction import dice
from kprism.samples import sample_path
scene = nodes.headless_scene()
image = batch.read_volume(scene, sample_path("ct", "ts_ct_001crop.nii.gz"))
truth = nodes.volume_array(batch.read_volume(scene, sample_path("ct", "ts_ct_001crop_labels.nii.gz"), labelmap=True)) == 5
segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
segmentation.SetReferenceImageGeometryParameterFromVolumeNode(image)
written = KPrismLogic(device="cpu", threads=1).segment(image, segmentation, "semantic", classes=["liver"])
liver = nodes.segment_mask(segmentation, written["liver"], image)
print(json.dumps({{"kprism": kprism.__file__, "lib": nodes.__file__, "weights": str(kprism.weights.resolve_weights(None)),
                  "dice": dice(liver, truth), "missing": install.missing(),
                  "extras_loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
                  "distributions": loaded_distributions()}}))
"""
    result = isolated_python("import json\n" + LOADED_DISTRIBUTIONS + script)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("kprism", "lib", "weights"):
        assert Path(report[key]).is_relative_to(tmp_path), f"{key} came from {report[key]}, not the install layout"
    assert report["missing"] == [] and report["extras_loaded"] == []
    undeclared = set(report["distributions"]) - runtime_closure() - SLICERS_OWN - {"kprism"}  # kprism: the bundle
    assert {"torch", "scipy", "safetensors", "pydantic"} <= set(report["distributions"])  # the check sees imports
    assert not undeclared, f"inference imported packages that pyproject's runtime dependencies do not bring: {undeclared}"
    assert report["dice"] > 0.8, f"liver Dice {report['dice']:.3f} from the installed extension"


def test_a_source_checkout_added_as_a_module_path_finds_the_repositorys_kprism():
    result = isolated_python(f"sys.path.insert(0, {str(SLICER_MODULE_DIR)!r})\n"
                             "import KPrismSlicerLib, kprism, kprism.weights\n"
                             "print(kprism.__file__); print(kprism.weights.resolve_weights(None))")
    assert result.returncode == 0, result.stderr[-3000:]
    package, weights = (Path(line) for line in result.stdout.split())
    assert package == ROOT / "KPrismCore" / "kprism" / "__init__.py" and weights.is_relative_to(ROOT / "KPrismCore")


def test_without_the_bundled_package_the_module_says_so_in_one_line(tmp_path):
    modules = install_layout(tmp_path)
    shutil.rmtree(modules / "kprism")
    result = isolated_python(f"sys.path.insert(0, {str(modules)!r})\n"
                             "from KPrismSlicerLib import batch\n"
                             "print(batch.dependencies_problem())")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("The kprism package is missing from the KPrism extension")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cross-check with CMake itself needs the cmake program")
def test_cmake_itself_selects_the_same_kprism_files(tmp_path):
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    block = text[text.index("set(_kprism_dir"): text.index("foreach(_file IN LISTS KPRISM_PACKAGE_FILES)")]
    block = block.replace("CONFIGURE_DEPENDS", "")  # a configure-time option; cmake -P refuses it
    script = tmp_path / "list.cmake"
    script.write_text(f'set(CMAKE_CURRENT_SOURCE_DIR "{SLICER_MODULE_DIR}")\n{block}\n'
                      'foreach(_file IN LISTS KPRISM_PACKAGE_FILES)\n  message("${_file}")\nendforeach()\n')
    listed = subprocess.run(["cmake", "-P", str(script)], capture_output=True, encoding="utf-8", timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stderr.split()) == kprism_package_files()[1]


def test_the_extension_ships_what_the_wheel_ships():
    """The CMake glob uses the wheel's patterns: the code, the weights the manifest names, the samples."""
    base, files = kprism_package_files()
    data = tomllib.loads((ROOT / "KPrismCore" / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = data["tool"]["setuptools"]["package-data"]["kprism"]
    globbed = MODULE_CMAKE.read_text(encoding="utf-8")
    assert all(f"${{_kprism_dir}}/{pattern.replace('**/*', '*')}" in globbed for pattern in package_data)
    manifest = json.loads((ROOT / "KPrismCore" / "kprism" / "models.json").read_text(encoding="utf-8"))
    on_disk = {f"weights/{m['filename']}" for m in manifest if (base / "weights" / m["filename"]).is_file()}
    assert "weights/kprism-tiny.safetensors" in on_disk and on_disk <= set(files)  # every bundled model ships
    assert {"__init__.py", "session.py", "models.json", "samples/ct/ts_ct_001crop.nii.gz"} <= set(files)
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


# ----------------------------------------------------------------------------------------------- Python version


def test_an_old_slicer_python_gets_one_line_naming_the_supported_slicer():
    from KPrismSlicerLib import bundled

    line = bundled.python_problem((3, 9, 10))
    assert "3D Slicer 5.10 or later" in line and "3.9.10" in line and "\n" not in line
    assert bundled.python_problem((3, 12, 10)) is None and bundled.python_problem((3, 10, 0)) is None
    for path in (SLICER_MODULE_DIR / "KPrismSlicerLib" / "bundled.py", SLICER_MODULE_DIR / "KPrismSlicerLib" / "__init__.py"):
        ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))  # they must load on Slicer 5.8 to say it


# ----------------------------------------------------------------------------------------------- installer


class Recorder:
    """Slicer's dialogs and installers, replaced: what was asked and what pip was told."""

    def __init__(self, monkeypatch, answers=(True,), missing_sequence=None):
        import slicer

        from KPrismSlicerLib import install

        self.dialogs, self.pip_install, self.pip_ensure, self.torch = [], [], [], []
        self.answers = list(answers)
        monkeypatch.setattr(install, "_declined_this_session", False)
        monkeypatch.delenv(install.WHEELS_VARIABLE, raising=False)
        monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", self.confirm, raising=False)
        monkeypatch.setattr(slicer.util, "pip_install", lambda args: self.pip_install.append(self._with_constraints(args)),
                            raising=False)
        packaging = types.ModuleType("slicer.packaging")
        packaging.pip_ensure = lambda reqs, **kw: self.pip_ensure.append((list(reqs), kw, Path(kw["constraints"]).read_text()))
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
        torch_utils = types.ModuleType("PyTorchUtils")
        recorder = self

        class PyTorchUtilsLogic:
            def installTorch(self, **kwargs):
                recorder.torch.append(kwargs)
                return object()

        torch_utils.PyTorchUtilsLogic = PyTorchUtilsLogic
        monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)
        sequence = iter(missing_sequence or [])
        real_missing = install.missing
        monkeypatch.setattr(install, "missing", lambda: next(sequence, None) or ([] if missing_sequence else real_missing()))

    def confirm(self, text, windowTitle=None, **kwargs):
        self.dialogs.append(text)
        return self.answers.pop(0)

    @staticmethod
    def _with_constraints(args):
        args = list(args)
        if "-c" in args:
            args.append(Path(args[args.index("-c") + 1]).read_text())
        return args


TORCH, PACKAGES = "torch>=2.1", ["pydantic>=2", "slicerio>=1.0"]


def test_one_dialog_then_torch_from_the_pytorch_extension_and_the_rest_through_pip_ensure(monkeypatch):
    from KPrismSlicerLib import install

    # missing() is asked: before (what to install), by the constraints file, twice after (check, constraints)
    recorder = Recorder(monkeypatch, missing_sequence=[[TORCH, *PACKAGES], [TORCH, *PACKAGES], [], []])
    assert install.ensure_dependencies(ask=True) is True
    assert len(recorder.dialogs) == 1 and all(line in recorder.dialogs[0] for line in [TORCH, *PACKAGES])
    assert recorder.torch == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]  # no second dialog
    (requested, options, constraints), = recorder.pip_ensure
    assert requested == PACKAGES and options["prompt_install"] is False and options["requester"] == "KPrism"
    assert f"numpy=={version('numpy')}" in constraints.split()  # Slicer's numpy is pinned, never replaced
    assert recorder.pip_install == []


def test_slicer_5_10_installs_with_pip_install_and_the_same_constraints(monkeypatch):
    from KPrismSlicerLib import install

    recorder = Recorder(monkeypatch, missing_sequence=[PACKAGES, PACKAGES, []])
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # no slicer.packaging before 5.12
    assert install.ensure_dependencies(ask=False) is True
    (arguments,) = recorder.pip_install
    assert arguments[0] == "-c" and arguments[2:4] == PACKAGES and f"numpy=={version('numpy')}" in arguments[-1]
    assert recorder.dialogs == [] and recorder.torch == []


def test_a_wheel_folder_installs_everything_offline(monkeypatch, tmp_path):
    from KPrismSlicerLib import install

    recorder = Recorder(monkeypatch, missing_sequence=[[TORCH, *PACKAGES], [TORCH, *PACKAGES], [], []])
    monkeypatch.setenv(install.WHEELS_VARIABLE, str(tmp_path))
    assert install.ensure_dependencies(ask=True) is True
    assert f"from the wheel folder {tmp_path}" in recorder.dialogs[0]
    torch_call, packages_call = recorder.pip_install
    for call, wanted in ((torch_call, [TORCH]), (packages_call, PACKAGES)):
        assert call[:3] == ["--no-index", "--find-links", str(tmp_path)] and call[5:-1] == wanted
    assert recorder.torch == [] and recorder.pip_ensure == []  # nothing from the network


def test_a_declined_install_is_not_asked_again_until_the_user_asks(monkeypatch):
    from KPrismSlicerLib import install

    recorder = Recorder(monkeypatch, answers=[False, True], missing_sequence=[[TORCH]] * 3 + [[], []])
    assert install.ensure_dependencies() is False and install.was_declined()
    assert install.ensure_dependencies() is False and len(recorder.dialogs) == 1  # remembered: no second dialog
    assert recorder.torch == [] and recorder.pip_install == []
    assert install.ensure_dependencies(even_if_declined=True) is True  # the "Install dependencies" button
    assert len(recorder.dialogs) == 2 and len(recorder.torch) == 1 and not install.was_declined()


def test_a_wrong_wheel_folder_is_one_line_and_installs_nothing(monkeypatch, tmp_path):
    from KPrismSlicerLib import install

    recorder = Recorder(monkeypatch, missing_sequence=[[TORCH]] * 4)
    monkeypatch.setenv(install.WHEELS_VARIABLE, str(tmp_path / "absent"))
    with pytest.raises(RuntimeError, match="is not a folder") as error:
        install.ensure_dependencies()
    assert "\n" not in str(error.value) and recorder.dialogs == recorder.pip_install == recorder.torch == []


def test_nothing_asks_pip_for_kprism_nor_for_slicers_own_packages():
    from packaging.requirements import Requirement

    from KPrismSlicerLib import install

    names = {Requirement(line).name.lower() for line in install.requirements()}
    assert names and not names & {"kprism", "torch", "numpy", "simpleitk", "monai", "pyyaml", "matplotlib"}


# ----------------------------------------------------------------------------------------------- packaging files


def test_derived_packaging_files_agree_with_their_sources():
    stale = [str(p.relative_to(ROOT)) for p in sync_packaging.stale_files()]
    assert stale == [], f"{stale} out of date: run `make packaging`"


def test_runtime_dependencies_are_ranges_and_training_needs_are_extras():
    project = tomllib.loads((ROOT / "KPrismCore" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {sync_packaging.requirement_name(d): d for d in project["dependencies"]}
    assert runtime["torch"].replace(" ", "").startswith("torch>=") and not [d for d in runtime.values() if "==" in d]
    assert not {"monai", "pyyaml", "matplotlib"} & set(runtime)
    extras = {name: {sync_packaging.requirement_name(d) for d in deps} for name, deps in project["optional-dependencies"].items()}
    assert {"monai", "pyyaml", "matplotlib"} <= extras["train"] and {"monai", "matplotlib"} <= extras["eval"]
    assert "KPrismCore[train,eval,test]" in (ROOT / "Makefile").read_text(encoding="utf-8")


# Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (commit 583e9b3), the rules it states.
CATALOG_SCHEMA = {
    "type": "object", "required": ["$schema", "category", "scm_url"], "additionalProperties": False,
    "properties": {
        "$schema": {"type": "string"}, "category": {"type": "string"}, "scm_url": {"type": "string"},
        "scm_revision": {"type": "string"}, "scm_type": {"type": "string", "enum": ["git", "local"]},
        "build_dependencies": {"type": "array", "items": {"type": "string"}},
        "dicom_support_rule": {"type": "string"}, "build_subdirectory": {"type": "string"},
        "enabled": {"type": "boolean"}, "tier": {"type": "integer", "minimum": 1, "maximum": 5},
    },
}
JSON_TYPES = {"string": str, "array": list, "boolean": bool, "object": dict}


def schema_errors(entry: dict) -> list[str]:
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        return [e.message for e in jsonschema.Draft7Validator(CATALOG_SCHEMA).iter_errors(entry)]
    errors = [f"missing {key}" for key in CATALOG_SCHEMA["required"] if key not in entry]
    for key, value in entry.items():
        rule = CATALOG_SCHEMA["properties"].get(key)
        if rule is None:
            errors.append(f"unknown property {key}")
        elif rule["type"] == "integer":
            if not (isinstance(value, int) and not isinstance(value, bool) and rule["minimum"] <= value <= rule["maximum"]):
                errors.append(f"{key} must be an integer in 1..5")
        elif not isinstance(value, JSON_TYPES[rule["type"]]) or (rule["type"] == "string" and rule.get("enum", [value]).count(value) == 0):
            errors.append(f"{key} has the wrong type or value")
        elif rule["type"] == "array" and not all(isinstance(item, str) for item in value):
            errors.append(f"{key} must list strings")
    return errors


def test_the_catalog_entry_meets_the_schema_and_the_index_checks():
    """ExtensionsIndex scripts/check_description_files.py (commit 07f1d1b): schema, names, CMake content."""
    path = ROOT / "KPrism.json"
    entry = json.loads(path.read_text(encoding="utf-8"))
    assert "schema-v1.0.2" in entry["$schema"] and schema_errors(entry) == []
    assert b"\r" not in path.read_bytes() and entry["category"] == "Segmentation"
    extension = path.stem
    repository = entry["scm_url"].rstrip("/").removesuffix(".git").rsplit("/", 1)[1]
    assert not extension.lower().startswith("slicer") and repository == f"Slicer{extension}"  # the naming rule (m5)
    cmake = TOP_CMAKE.read_text(encoding="utf-8")
    assert re.findall(r"project\s*\(\s*([^\s\)]+)", cmake, re.IGNORECASE)[0] == extension
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake)[0]  # the index reads it as text
    assert icon.startswith("https://") and icon == sync_packaging.icon_url() and (ROOT / sync_packaging.ICON_PATH).is_file()
    assert entry["build_dependencies"] == ["PyTorch"] and re.search(r"set\(EXTENSION_DEPENDS PyTorch\)", cmake)
    assert "5.10 or later" in cmake and (ROOT / "LICENSE").is_file()


def test_the_repository_url_is_written_in_exactly_one_tracked_file():
    entry = json.loads((ROOT / "KPrism.json").read_text(encoding="utf-8"))
    url = entry["scm_url"].removesuffix(".git")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, encoding="utf-8")
    if listed.returncode == 0:
        files = [ROOT / name for name in listed.stdout.splitlines()]
    else:  # an exported tree without git
        files = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    holders = []
    for path in files:
        if path.is_file() and path.stat().st_size < 2_000_000:
            text = path.read_bytes().decode("utf-8", "ignore")
            holders += [str(path.relative_to(ROOT))] * text.count(url)
    assert holders == ["KPrism.json"]


def test_the_readme_documents_the_offline_route_the_installer_reads():
    from KPrismSlicerLib import install

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for needle in (install.WHEELS_VARIABLE, install.WHEELS_SETTING, "Additional module paths", "Extensions Manager",
                   "5.10", "--no-index", "make packaging"):
        assert needle in readme, f"README does not mention {needle}"


# ----------------------------------------------------------------------------------------------- batch.py exits


def test_batch_in_slicer_exits_with_a_status_even_after_an_unforeseen_exception(monkeypatch, capsys):
    import slicer

    from KPrismSlicerLib import batch

    exits = []
    monkeypatch.setattr(slicer, "app", object(), raising=False)  # as inside the application
    monkeypatch.setattr(slicer.util, "exit", exits.append, raising=False)

    def crash(argv=None):
        raise MemoryError("out of memory\nsecond line")

    monkeypatch.setattr(batch, "main", crash)
    batch.script_entry([])
    assert exits == [1]
    assert capsys.readouterr().err.strip().splitlines() == ["kprism batch: unexpected error: MemoryError: out of memory"]
    monkeypatch.setattr(batch, "main", lambda argv=None: batch.parse_args(["--mode", "semantic"]))  # bad command line
    batch.script_entry([])
    assert exits == [1, 2]


def test_batch_with_missing_dependencies_says_so_and_installs_nothing(monkeypatch, tmp_path, capsys):
    import slicer

    from KPrismSlicerLib import batch
    from KPrismSlicerLib import install

    monkeypatch.setattr(install, "missing", lambda: [TORCH])
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: pytest.fail("the batch installed something"), raising=False)
    out = tmp_path / "out"
    code = batch.main(["--input", str(tmp_path), "--output", str(out), "--mode", "semantic", "--classes", "liver"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists() and len(err.splitlines()) == 1
    assert err.startswith("kprism batch: error: KPrism's Python packages are not installed: torch>=2.1.")


# ----------------------------------------------------------------------------------------------- optional extras


@pytest.mark.parametrize("command, module, extra", [("demo", "matplotlib.figure", "eval"), ("train", "yaml", "train"),
                                                    ("eval", "monai.metrics", "eval")])
def test_a_command_that_needs_a_missing_extra_says_which_in_one_line(monkeypatch, capsys, command, module, extra):
    from kprism import cli

    def missing(args):
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(cli, f"_{command}", missing)
    argv = {"demo": ["demo"], "train": ["train", "config.yaml"], "eval": ["eval", "--dataset", "folder"]}[command]
    assert cli.main(argv) == 1
    line, = capsys.readouterr().err.strip().splitlines()
    package = {"matplotlib.figure": "matplotlib", "yaml": "pyyaml", "monai.metrics": "monai"}[module]
    assert line == (f"kprism: error: `kprism {command}` needs {package}, an optional dependency that is not installed: "
                    f"pip install 'kprism[{extra}]'")
