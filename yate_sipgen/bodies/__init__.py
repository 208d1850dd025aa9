"""Bodies of SIP event packages: parsing what we receive (safely) and rendering what we send.

* :mod:`.xml` -- XML from a request, refused when it declares a DOCTYPE or entities;
* :mod:`.pidf` -- presence (RFC 3863): check, compose several publications into one;
* :mod:`.dialog_info` -- dialog state (RFC 4235);
* :mod:`.message_summary` -- message waiting (RFC 3842).

Plain functions, no I/O; everything taken from a request is escaped on the way out.
"""
