"""Tests for twisted/plugins/relayd_plugin.py: twistd finds ``msrprelay``."""

from __future__ import annotations

from twisted.application.service import IServiceMaker, ServiceMaker
from twisted.plugin import getPlugins

import relayd.tap


def _makers() -> dict[str, IServiceMaker]:
    return {maker.tapname: maker for maker in getPlugins(IServiceMaker)}


def _msrprelay() -> ServiceMaker:
    maker = _makers()["msrprelay"]
    assert isinstance(maker, ServiceMaker)
    return maker


def test_msrprelay_plugin_is_found() -> None:
    assert "msrprelay" in _makers()


def test_msrprelay_plugin_points_at_relayd_tap() -> None:
    maker = _msrprelay()
    assert IServiceMaker.providedBy(maker)
    assert maker.name == "relayd"
    assert "MSRP relay" in maker.description
    assert maker.options is relayd.tap.Options
    assert maker.makeService == relayd.tap.makeService


def test_plugin_module_imports_nothing_heavy() -> None:
    import twisted.plugins.relayd_plugin as plugin

    assert plugin.msrprelay.tapname == "msrprelay"
    assert plugin.msrprelay.module == "relayd.tap"
