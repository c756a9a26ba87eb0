"""The app's shared keys, in one place so route modules need not import each other."""

from aiohttp import web

from vlmguard.config import Config

CONFIG_KEY = web.AppKey("config", Config)
DATABASE_KEY = web.AppKey("database", object)  # vlmguard.web.database.Database
LIMITER_KEY = web.AppKey("sign_in_limiter", object)  # vlmguard.web.session.SignInLimiter
TARGETS_KEY = web.AppKey("targets", dict)
LIVE_KEY = web.AppKey("live", dict)  # camera -> llhls.LiveStream, in the streaming process
SECRET_KEY = web.AppKey("secret", bytes)
STATIC_KEY = web.AppKey("static", dict)
HUB_KEY = web.AppKey("hub", object)
GUARD_KEY = web.AppKey("guard", list)  # the ConnectionGuard, once the server runs
CLIP_SLOTS_KEY = web.AppKey("clip_slots", object)  # an asyncio.Semaphore
LIVE_PROXY_KEY = web.AppKey("live_proxy", object)  # vlmguard.web.proxy.LiveProxy
CHILD_STATE_KEY = web.AppKey("child_state", object)  # child.ChildState of the serving process
