"""The HTTP routes, one router per resource. Each router's route class says who may call it
(service/auth.py); ``ROUTERS`` is what ``create_app`` mounts."""
