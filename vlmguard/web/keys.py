"""The app's shared keys, in one place so route modules need not import each other."""

from aiohttp import web

from vlmguard.config import Config

CONFIG_KEY = web.AppKey("config", Config)
STORE_KEY = web.AppKey("store", list)
TARGETS_KEY = web.AppKey("targets", dict)
CLIP_SLOTS_KEY = web.AppKey("clip_slots", object)  # an asyncio.Semaphore
