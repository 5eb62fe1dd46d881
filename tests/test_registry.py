"""The one registry class (datagen.format.registry) and its three users: networks, style methods
and segment sources; lazy entries are imported only when asked for."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

from datagen.format.registry import Registry

TARGET = "tests_registry_target"
"""A module made by the tests (only in sys.modules): the plugin registers into its ``REG``."""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The name of a module ``reg_plugin_<n>`` in tmp_path, importable, that nothing has imported
    yet; when imported it registers its class ``Fancy`` as "fancy" in ``tests_registry_target.REG``
    (None until a test sets it)."""
    name = f"reg_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        f"import {TARGET} as target\n"
        "\n"
        "@target.REG.register('fancy')\n"
        "class Fancy:\n"
        "    pass\n"
        "\n"
        "class Plain:\n"
        "    pass\n")
    target = types.ModuleType(TARGET)
    target.REG = None
    monkeypatch.setitem(sys.modules, TARGET, target)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_decorator_registers_and_get_returns_the_entry():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return 2

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and reg.get("b") is b
    assert reg.names() == ("a", "b") and list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg and 3 not in reg and ["a"] not in reg


def test_lazy_entries_are_imported_on_first_get_only(plugin):
    reg = sys.modules[TARGET].REG = Registry("widget", lazy={"fancy": f"{plugin}:Fancy"})
    reg.register_lazy("plain", f"{plugin}:Plain")
    assert reg.names() == ("fancy", "plain") and "fancy" in reg
    assert plugin not in sys.modules  # listing, membership: nothing imported

    plain = reg.get("plain")
    assert plugin in sys.modules and plain is sys.modules[plugin].Plain
    # importing the module ran its decorator for "fancy": it filled the lazy entry in, no duplicate
    assert reg.get("fancy") is sys.modules[plugin].Fancy
    assert reg.get("plain") is plain


def test_a_lazy_entry_naming_a_missing_attribute_or_module_fails_on_get(plugin):
    reg = Registry("widget", lazy={"gone": f"{plugin}:Nothing", "nowhere": "no_such_module_xyz:f"})
    with pytest.raises(ImportError, match=f"{plugin}:Nothing"):
        reg.get("gone")
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        reg.get("nowhere")


@pytest.mark.parametrize("target", ["module", "module:", ":attr", "a:b:c"])
def test_a_lazy_entry_must_name_module_and_attribute(target):
    with pytest.raises(ValueError, match="module:attribute"):
        Registry("widget").register_lazy("x", target)


def test_unknown_name_names_the_kind_the_name_and_the_known_names():
    reg = Registry("widget", lazy={"b": "m:b", "a": "m:a"})
    with pytest.raises(ValueError) as error:
        reg.get("zz")
    assert str(error.value) == "unknown widget 'zz'; known: a, b"
    assert str(pytest.raises(ValueError, Registry("gadget").get, "x").value) == "unknown gadget 'x'; known: none"
    with_plural = Registry("segment source", plural="sources", reserved={"off": "means nothing"},
                           lazy={"coco": "m:c"})
    assert with_plural.unknown_message("x") == "unknown segment source 'x'; known sources: off, coco"


def test_registering_a_name_twice_is_an_error():
    reg = Registry("widget", lazy={"lazy": "some.module:thing"})

    @reg.register("one")
    def one():
        pass

    with pytest.raises(ValueError, match="widget 'one' is already registered"):
        reg.register("one")(one)
    with pytest.raises(ValueError, match="widget 'one' is already registered"):
        reg.register_lazy("one", "m:one")
    with pytest.raises(ValueError, match="widget 'lazy' is already registered"):
        reg.register_lazy("lazy", "some.module:thing")
    # a decorated object that is not the one the lazy entry names does not replace it
    with pytest.raises(ValueError, match="widget 'lazy' is already registered"):
        reg.register("lazy")(one)
    reg.unregister("one")
    reg.register("one")(one)
    assert reg.get("one") is one


def test_reserved_names_cannot_be_registered_and_are_not_entries():
    reg = Registry("style method", reserved={"none": "it means no style step"})
    with pytest.raises(ValueError, match="'none' is reserved: it means no style step"):
        reg.register("none")
    with pytest.raises(ValueError, match="'none' is reserved"):
        reg.register_lazy("none", "m:x")
    assert "none" not in reg and reg.names() == ()
    with pytest.raises(ValueError, match="unknown style method 'none'"):
        reg.get("none")


# -- the three users ---------------------------------------------------------------------

def test_the_three_registries_list_their_names_without_importing_their_modules():
    code = (
        "import sys\n"
        "from trainer.models import MODELS\n"
        "from datagen.style import STYLIZERS, stylizer_names\n"
        "from datagen.segments import SOURCES, INPUTS\n"
        "import datagen.cli, trainer.cli\n"
        "assert MODELS.names() == ('ncnet', 'transformer'), MODELS.names()\n"
        "assert stylizer_names() == ('adain', 'color'), stylizer_names()\n"
        "assert SOURCES.names() == INPUTS.names() == ('coco', 'lost'), SOURCES.names()\n"
        "heavy = ['torch', 'timm', 'pycocotools.coco', 'trainer.models.cross_image', 'trainer.models.ncnet',\n"
        "         'datagen.style.adain', 'datagen.style.color', 'datagen.segments.coco_source',\n"
        "         'datagen.segments.lost_source']\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_registries_give_their_kinds_in_errors():
    from datagen.segments import get_source, source_inputs
    from datagen.style import make_stylizer, register_stylizer

    with pytest.raises(ValueError, match=r"unknown segment source 'nope'; known sources: coco, lost"):
        get_source("nope")
    with pytest.raises(ValueError, match=r"unknown segment source 'nope'; known sources: coco, lost"):
        source_inputs("nope", device="cpu")
    with pytest.raises(ValueError, match=r"unknown style method 'gatys'; known: none, adain, color"):
        make_stylizer("gatys")
    with pytest.raises(ValueError, match="style 'none' has no stylizer"):
        make_stylizer("none")
    with pytest.raises(ValueError, match="'none' is reserved: it means no style step"):
        register_stylizer("none")


def test_the_stylizer_modules_fill_in_their_lazy_entries():
    from datagen.style import STYLIZERS, stylizer_class
    from datagen.style.color import ColorStylizer

    assert stylizer_class("color") is ColorStylizer and STYLIZERS.get("color") is ColorStylizer
    with pytest.raises(ValueError, match="style method 'color' is already registered"):
        STYLIZERS.register("color")(type("OtherColor", (), {}))
