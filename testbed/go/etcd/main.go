// Command etcd is upstream etcd's server main, built from go.etcd.io/etcd/server/v3 at the version
// go.mod pins (the etcd repository's own root module cannot be `go install`ed: it has relative replaces).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
