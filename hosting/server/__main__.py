from hosting.server.app import main

main()
