"""shardline: line-exact parallel processing of large objects in S3.

Workers download approximate byte ranges concurrently and settle line
boundaries with a pipelined neighbour handshake; see DESIGN.md in the
project's shared folder and README.md.
"""

__version__ = "0.1.0"
