"""Sensors: the scene sensor turns newly published STAC items into partitions and runs."""

from geofm_assets.sensors.scene_sensor import scene_sensor

__all__ = ["scene_sensor"]
