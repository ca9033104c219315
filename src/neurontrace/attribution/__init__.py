"""Attribution of a metric to units at every layer and position: RelP, AtP, integrated gradients, exact patching."""
