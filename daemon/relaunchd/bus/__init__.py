"""The D-Bus adapter (the only package that imports gi/pydbus; DESIGN "Layers").

`service`: `org.relaunchd.Relaunch1` over the engine, with polkit; `client`: what
`relaunchctl` uses; `variants`/`error_names`: the value and error mappings both share;
`glib_leak`: the GLib 2.74 per-call leak fix; `mainloop`: the bus connection and main loop;
`logind`: logind's inhibitor locks for the platform's readiness check.
"""
