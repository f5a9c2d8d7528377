// filled by a later commit
