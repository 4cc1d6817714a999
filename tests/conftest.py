import os
import sys

# Spawned test processes import the helpers in this folder by module name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
