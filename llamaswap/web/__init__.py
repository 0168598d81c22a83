"""The HTTP face of llamaswap.

``render`` writes JSON and runs async renders; ``dispatch`` routes inference requests to
models; ``manage`` holds the management endpoints; ``ui`` serves the web UI's files;
``tree`` declares which resource answers which path; ``site`` has the request class, the
``Site`` and the access log; ``context`` has what resources share (``WebContext``) and the record of a
model-dispatched request (``RequestRecord``).
"""
