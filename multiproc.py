#!/usr/bin/env python3
"""Start one training process per GPU (or per CPU worker) on each node: the reference's flags on torchrun.

    python multiproc.py --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...
    # two nodes; run on each with its --node_rank:
    python multiproc.py --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \\
        main.py /imagenet ...

See image_classification/multiproc.py (also installed as efficientnet-multiproc).
"""
from image_classification.multiproc import main

if __name__ == "__main__":
    main()
