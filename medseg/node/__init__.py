"""medseg as a DICOM node: receive CT by C-STORE, segment it, send the SEG and SR back.

``medseg listen -o OUT_DIR --port N --allow ORTHANC --send-to ORTHANC@pacs:4242`` (or a
``job: listen`` pipeline file run by ``medseg run``):

* :mod:`medseg.node.scp`: the Storage SCP (pynetdicom): who may store, what is accepted,
  the atomic spool, the end of each transfer;
* :mod:`medseg.node.state`: ``OUT_DIR/node.sqlite``, the series received and the sends owed;
* :mod:`medseg.node.service`: the main loop: complete series, series selection, the batch
  runner (:func:`medseg.batch.run_batch`: the same state, retries and outputs as
  ``medseg batch``), sends, spool clean-up, restart safety;
* :mod:`medseg.node.send`: C-STORE of the results;
* :mod:`medseg.node.cli`: the ``listen`` subcommand.

The node depends on batch's public API and on pacs' series selection; batch imports
neither (ARCHITECTURE.md). See docs/how-to/dicom-node.md.
"""

from __future__ import annotations

from medseg._lazy import lazy_getattr

__all__ = ["Destination", "Node", "NodeConfig", "NodeState", "SendError", "run_node"]

_WHERE = {"Destination": "medseg.node.send", "SendError": "medseg.node.send",
          "Node": "medseg.node.service", "NodeConfig": "medseg.node.service",
          "run_node": "medseg.node.service", "NodeState": "medseg.node.state"}

__getattr__ = lazy_getattr(__name__, _WHERE)
