"""Scale-out: a model repository served by Ray Serve deployments behind trtserve's front door.

Only ``settings`` (the ``[ray]`` config table) is imported by the rest of trtserve, and it
does not import Ray.  The other modules import Ray and are loaded only by
``trtserve serve --ray``: ``cluster`` (connect, start Serve), ``replica`` (the Serve
deployment that runs a model's pipeline), ``forwarder`` (front door -> replicas) and
``repository`` (the front door's model repository).  docs/scaling.md is the user's guide.
"""
